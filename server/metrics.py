"""Prometheus metrics: the KV-cache memory story next to the usual serving figures.

Static figures (capacity, bits and bytes per token, capacity ratio) are computed once the engine has sized its
cache. Live figures come from vLLM's own statistics: :class:`EngineStatLogger` is a stat logger handed to
``AsyncLLM`` (vLLM's supported route for custom metrics), so block usage, queue lengths, token counts and
latencies are the scheduler's numbers, not estimates made by the server.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from vllm.config import VllmConfig
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

from xquant_vllm import plugin
from xquant_vllm.accounting import ModelShape, bits_report

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class KVFigures:
    """What one cached token costs and how many fit, for the cache the engine actually built."""

    cache_dtype: str
    block_size: int
    num_blocks: int  # usable blocks: vLLM's pool less its null block
    capacity_tokens: int  # vLLM's own figure
    kv_bytes: int  # the memory the cache was given
    bytes_per_token: float  # pages only, all layers and KV heads
    tail_bytes_per_seq: int  # full-precision tail slot of one running sequence (0 without quantization)
    true_bits: float  # bits per cached element, pages and one tail per sequence of max_model_len tokens
    model_dtype_bytes_per_token: int
    model_dtype_bits: int

    @property
    def capacity_ratio(self) -> float:
        """Tokens held against what the model dtype would hold in the same memory."""
        return self.capacity_tokens / (self.kv_bytes / self.model_dtype_bytes_per_token)


def model_shape(vllm_config: VllmConfig) -> ModelShape:
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return ModelShape(
        name=mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model,
        num_layers=mc.get_num_layers(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
    )


def kv_figures(vllm_config: VllmConfig) -> KVFigures:
    """Read the cache vLLM built (after start-up) and cost it with :mod:`xquant_vllm.accounting`.

    xquant presets are costed by the accounting, with the config the plugin resolved for this engine (its
    overrides included); any other dtype by its element size.
    """
    cc, mc = vllm_config.cache_config, vllm_config.model_config
    shape = model_shape(vllm_config)
    dtype = cc.cache_dtype
    max_len = mc.max_model_len
    if plugin.is_xquant(dtype):
        report = bits_report(plugin.engine_quant_config(vllm_config), shape)
        per_token, tail, true_bits = report.bytes_per_token, report.tail_bytes_per_seq, report.true_bits(max_len)
    else:
        element = torch.empty((), dtype=kv_cache_dtype_str_to_dtype(dtype, mc)).element_size()
        per_token, tail, true_bits = float(shape.elements_per_token * element), 0, 8.0 * element
    num_blocks = (cc.num_gpu_blocks or 1) - 1
    capacity = cc.kv_cache_size_tokens or num_blocks * cc.block_size
    kv_bytes = cc.kv_cache_memory_bytes or int(num_blocks * cc.block_size * per_token)
    return KVFigures(
        cache_dtype=dtype,
        block_size=cc.block_size,
        num_blocks=num_blocks,
        capacity_tokens=capacity,
        kv_bytes=kv_bytes,
        bytes_per_token=per_token,
        tail_bytes_per_seq=tail,
        true_bits=true_bits,
        model_dtype_bytes_per_token=shape.elements_per_token * shape.dtype_bytes,
        model_dtype_bits=8 * shape.dtype_bytes,
    )


class _RateWindow:
    """Events per second over the last ``RATE_WINDOW_S``, read at scrape time so that it decays when idle."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()

    def add(self, count: int) -> None:
        if count:
            self._events.append((time.monotonic(), count))

    def rate(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW_S
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()
        return sum(c for _, c in self._events) / RATE_WINDOW_S


class ServerMetrics:
    """All metrics of one server, in a registry of their own (vLLM keeps its own in the global one)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.kv_blocks_total = 0
        # Static KV figures, set once the cache is sized.
        self.capacity_tokens = Gauge(
            "xquant_kv_capacity_tokens", "KV cache capacity in tokens (vLLM's figure)", registry=r
        )
        self.capacity_ratio = Gauge(
            "xquant_kv_capacity_ratio", "Tokens held against the model dtype in the same KV memory", registry=r
        )
        self.kv_bytes = Gauge("xquant_kv_cache_bytes", "Memory given to the KV cache", registry=r)
        self.bytes_per_token = Gauge(
            "xquant_kv_bytes_per_token", "KV bytes per cached token, all layers and KV heads (pages only)", registry=r
        )
        self.tail_bytes = Gauge(
            "xquant_kv_tail_bytes_per_seq", "Full-precision tail held per running sequence", registry=r
        )
        self.true_bits = Gauge(
            "xquant_kv_true_bits", "True bits per cached element (pages and tail, max_model_len sequences)", registry=r
        )
        self.model_dtype_bits = Gauge("xquant_kv_model_dtype_bits", "Bits per element of the model dtype", registry=r)
        self.block_size = Gauge("xquant_kv_block_size_tokens", "Tokens per KV block", registry=r)
        self.info = Gauge("xquant_kv_cache_info", "The KV cache dtype in use", ["kv_cache_dtype"], registry=r)
        # Live figures from the scheduler.
        self.blocks_used = Gauge("xquant_kv_blocks_used", "KV blocks in use", registry=r)
        self.blocks_free = Gauge("xquant_kv_blocks_free", "KV blocks free", registry=r)
        self.usage = Gauge("xquant_kv_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.running = Gauge("xquant_requests_running", "Requests the scheduler is running", registry=r)
        self.waiting = Gauge("xquant_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.prompt_tokens = Counter("xquant_prompt_tokens", "Prompt tokens computed", registry=r)
        self.generation_tokens = Counter("xquant_generation_tokens", "Tokens generated", registry=r)
        self._prompt_rate, self._gen_rate = _RateWindow(), _RateWindow()
        Gauge(
            "xquant_prompt_tokens_per_second", f"Prompt tokens/s over the last {RATE_WINDOW_S:g} s", registry=r
        ).set_function(self._prompt_rate.rate)
        Gauge(
            "xquant_generation_tokens_per_second", f"Generated tokens/s over the last {RATE_WINDOW_S:g} s", registry=r
        ).set_function(self._gen_rate.rate)
        self.e2e = Histogram(
            "xquant_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "xquant_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.finished = Counter("xquant_requests_finished", "Finished requests", ["reason"], registry=r)
        self.rejected = Counter("xquant_requests_rejected", "Requests refused because the queue was full", registry=r)

    def set_kv(self, kv: KVFigures) -> None:
        self.kv_blocks_total = kv.num_blocks
        self.capacity_tokens.set(kv.capacity_tokens)
        self.capacity_ratio.set(kv.capacity_ratio)
        self.kv_bytes.set(kv.kv_bytes)
        self.bytes_per_token.set(kv.bytes_per_token)
        self.tail_bytes.set(kv.tail_bytes_per_seq)
        self.true_bits.set(kv.true_bits)
        self.model_dtype_bits.set(kv.model_dtype_bits)
        self.block_size.set(kv.block_size)
        self.info.labels(kv_cache_dtype=kv.cache_dtype).set(1)
        self.blocks_free.set(kv.num_blocks)

    def record_scheduler(self, stats: SchedulerStats) -> None:
        used = round(stats.kv_cache_usage * self.kv_blocks_total)
        self.blocks_used.set(used)
        self.blocks_free.set(self.kv_blocks_total - used)
        self.usage.set(stats.kv_cache_usage)
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs + stats.num_skipped_waiting_reqs)

    def record_iteration(self, stats: IterationStats) -> None:
        prompt = stats.num_prompt_tokens
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self._prompt_rate.add(prompt)
        self._gen_rate.add(stats.num_generation_tokens)
        for ttft in stats.time_to_first_tokens_iter:
            self.ttft.observe(ttft)
        for done in stats.finished_requests:
            self.e2e.observe(done.e2e_latency)
            self.finished.labels(reason=str(done.finish_reason)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineStatLogger(StatLoggerBase):
    """Forwards each engine step's statistics to :class:`ServerMetrics` (one engine, no data parallelism)."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0, *, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self.metrics.record_scheduler(scheduler_stats)
        if iteration_stats is not None:
            self.metrics.record_iteration(iteration_stats)

    def log_engine_initialized(self) -> None:
        pass

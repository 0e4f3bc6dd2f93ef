"""The vLLM attention backend of the quantized cache: backend class, per-step planner, metadata builder, impl.

vLLM allocates each layer's pages (``[num_blocks, H, 1, page_bytes]`` uint8, sized by
:func:`xquant_vllm.plugin.layer_kv_cache_spec`) in one block pool with one block table. Around it this module
keeps, per worker, what vLLM does not know about:

* the full-precision tails (``tail_k/tail_v [num_tail_slots, H, B, D]`` per layer, model dtype), whose bytes
  were taken out of the KV budget before vLLM sized the pool (:func:`xquant_vllm.plugin.tail_reserved_bytes`);
* the tail slot of every batch row (:class:`xquant_vllm.tail.TailAllocator`) and the step's
  :class:`~xquant_vllm.kernels.StepPlan`, built once per step and shared by every layer.

A layer's forward runs attention first (past-only: pages + tail + the chunk itself), then stores the chunk
(completed blocks quantized into pages, the rest into the tail). The upper layer of a cross-layer pair reads
the lower layer's pages at the same block ids; both must see the same plan, which the impl checks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1 import kv_cache_interface
from vllm.v1.kv_cache_interface import AttentionSpec

from xquant_vllm.config import PRESETS, SUPPORTED_HEAD_SIZES, LayerQuant, QuantConfig
from xquant_vllm.kernels import StepPlan, build_step_plan, paged_attention, store_kv
from xquant_vllm.layout import PageLayout, page_layout
from xquant_vllm.plugin import BACKEND_NAME, XQuantConfigError, engine_quant_config, num_tail_slots
from xquant_vllm.tail import NO_SLOT, TailAllocator
from xquant_vllm.vllm_compat import attention_backend_name


class XQuantBackend(AttentionBackend):
    forward_includes_kv_cache_update = True  # attention reads the cache before the step's tokens are stored

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(PRESETS)

    @staticmethod
    def get_name() -> str:
        return attention_backend_name(BACKEND_NAME)

    @staticmethod
    def get_impl_cls() -> type[XQuantImpl]:
        return XQuantImpl

    @staticmethod
    def get_builder_cls() -> type[XQuantMetadataBuilder]:
        return XQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # A block is one key group: never split into smaller kernel blocks.
        return [MultipleOf(8)] if kv_cache_spec is None else [kv_cache_spec.block_size]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """The key group of this engine's preset (vLLM asks this after our config check set it)."""
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None or vllm_config.model_config is None:  # asked outside an engine
            return default_block_size
        return engine_quant_config(vllm_config).block_size

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    # Each layer's pages are contiguous, ``[block, head, page bytes]``. vLLM 0.32 asks for the layout by name;
    # 0.26 asks for a shape, whose last size (the layer's page bytes) it infers from the layer's allocation.
    if hasattr(kv_cache_interface, "KVCacheLayout"):

        @classmethod
        def supported_kv_cache_layouts(cls) -> tuple:
            return (kv_cache_interface.KVCacheLayout.LBHNC,)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, 1, -1)


@dataclass(frozen=True)
class LayerState:
    """What one layer's forward needs besides vLLM's arguments."""

    lq: LayerQuant
    layout: PageLayout
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    lower: str | None  # layer whose codes a shared layer reads
    lower_layout: PageLayout | None


@dataclass
class XQuantMetadata:
    plan: StepPlan
    num_tokens: int  # real rows of this step (vLLM may pad the token dimension)
    layers: dict[str, LayerState]


class StepPlanner:
    """Per worker: the tails of every xquant layer, the slot allocator, and the plan of the current step."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        cfg = engine_quant_config(vllm_config)
        self.config = weakref.ref(vllm_config)
        self.block_size = cfg.block_size
        self.device = device
        self.allocator = TailAllocator(num_tail_slots(vllm_config), cfg.block_size)
        self.layers = self._layer_states(vllm_config, cfg, device)
        self._last: tuple[CommonAttentionMetadata, StepPlan] | None = None

    def _layer_states(self, vllm_config: VllmConfig, cfg: QuantConfig, device: torch.device) -> dict[str, LayerState]:
        dtype = vllm_config.model_config.dtype
        modules = {
            name: layer
            for name, layer in get_layers_from_vllm_config(vllm_config, Attention).items()
            if layer.kv_cache_dtype in PRESETS
        }
        by_index = {extract_layer_index(name): name for name in modules}
        states = {}
        for name, layer in modules.items():
            lq = cfg.layer(extract_layer_index(name))
            shape = (self.allocator.num_slots, layer.num_kv_heads, cfg.block_size, cfg.head_size)
            lower = by_index.get(lq.index - 1) if lq.k_shared or lq.v_shared else None
            if (lq.k_shared or lq.v_shared) and lower is None:
                raise XQuantConfigError(f"layer {name} shares codes with layer {lq.index - 1}, which this worker lacks")
            states[name] = LayerState(
                lq=lq,
                layout=page_layout(lq, dtype),
                tail_k=torch.zeros(shape, dtype=dtype, device=device),
                tail_v=torch.zeros(shape, dtype=dtype, device=device),
                lower=lower,
                lower_layout=None if lower is None else page_layout(cfg.layer(lq.index - 1), dtype),
            )
        return states

    def plan(self, cm: CommonAttentionMetadata) -> StepPlan:
        """The step's plan; the builders of all attention groups get the same ``cm`` object within a step."""
        if self._last is not None and self._last[0] is cm:
            return self._last[1]
        # Built on the host (the allocator needs the lengths and block ids there anyway), then moved in one copy:
        # two device-to-host reads per step, whatever the batch.
        R = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: R + 1]
        seq_lens = cm.seq_lens[:R].cpu()
        past = seq_lens - (qsl[1:] - qsl[:-1])
        block_table = cm.block_table_tensor[:R]
        host_table = block_table.cpu()
        slots = self.allocator.assign(past.tolist(), seq_lens.tolist(), host_table.numpy())
        # A row without a tail never reads its slot (nothing cached past the last block, nothing left over).
        tail_slot = torch.tensor([0 if s == NO_SLOT else s for s in slots], dtype=torch.int32)
        plan = build_step_plan(qsl, past, host_table, tail_slot, self.block_size)
        plan = plan.to(self.device, block_table=block_table if block_table.dtype == torch.int32 else None)
        self._last = (cm, plan)
        return plan


_PLANNERS: weakref.WeakValueDictionary[int, StepPlanner] = weakref.WeakValueDictionary()


def planner_for(vllm_config: VllmConfig, device: torch.device) -> StepPlanner:
    """One planner per engine (per ``VllmConfig`` object) in this process, shared by all its builders."""
    planner = _PLANNERS.get(id(vllm_config))
    if planner is None or planner.config() is not vllm_config:
        planner = StepPlanner(vllm_config, device)
        _PLANNERS[id(vllm_config)] = planner
    return planner


class XQuantMetadataBuilder(AttentionMetadataBuilder[XQuantMetadata]):
    def __init__(
        self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.planner = planner_for(vllm_config, device)
        missing = sorted(set(layer_names) - set(self.planner.layers))
        if missing:
            raise XQuantConfigError(f"layers {missing} are in an xquant KV-cache group but do not use xquant")

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> XQuantMetadata:
        cm = common_attn_metadata
        return XQuantMetadata(
            plan=self.planner.plan(cm),
            num_tokens=int(cm.query_start_loc_cpu[cm.num_reqs]),
            layers=self.planner.layers,
        )


class XQuantImpl(AttentionImpl[XQuantMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "xquant",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra,
    ) -> None:
        refuse = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name is not None,
            "attn_type": attn_type != AttentionType.DECODER,
            **{name: value is not None for name, value in extra.items()},
        }
        for field, bad in refuse.items():
            if bad:
                raise XQuantConfigError(f"{field}: not supported by --kv-cache-dtype {kv_cache_dtype}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: XQuantMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the xquant backend")
        if attn_metadata is None:  # profiling and warm-up runs: no cache yet
            return output
        name = layer.layer_name
        state = attn_metadata.layers[name]
        plan, n = attn_metadata.plan, attn_metadata.num_tokens
        pages = _pages(kv_cache)
        lower_pages = None
        if state.lower is not None:
            context = get_forward_context()
            if context.attn_metadata[state.lower].plan is not plan:
                raise RuntimeError(
                    f"{name} reads the pages of {state.lower}, but the two layers are in different KV-cache groups"
                )
            lower_pages = _pages(context.no_compile_layers[state.lower].kv_cache)
        q, k, v = query[:n], key[:n], value[:n]
        paged_attention(
            q, k, v, pages, state.tail_k, state.tail_v, plan, state.lq, state.layout, self.scale, output[:n],
            lower_pages, state.lower_layout,
        )  # fmt: skip
        store_kv(k, v, pages, state.tail_k, state.tail_v, plan, state.lq, state.layout)
        return output


def _pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """vLLM's ``[num_blocks, H, 1, page_bytes]`` view as the kernels' ``[num_blocks, H, page_bytes]``."""
    return kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], -1)

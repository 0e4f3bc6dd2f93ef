"""The vLLM attention backend of the quantized cache: backend class, worker state, step planner, builder, impl.

vLLM allocates each layer's pages (``[num_blocks, H, 1, page_bytes]`` uint8, sized by
:func:`xquant_vllm.plugin.layer_kv_cache_spec`) in one block pool with one block table. Around it this module
keeps, per worker, what vLLM does not know about (:class:`WorkerState`, created once, before vLLM captures
graphs):

* the full-precision tails (``tail_k/tail_v [num_tail_slots, H, B, D]`` per layer, model dtype), whose bytes
  were taken out of the KV budget before vLLM sized the pool (:func:`xquant_vllm.plugin.tail_reserved_bytes`);
* the tail slot of every running request (:class:`xquant_vllm.tail.TailSlots`, fed by the model runner);
* the :class:`StepPlanner`, which turns each step's ``CommonAttentionMetadata`` into the
  :class:`~xquant_vllm.kernels.StepPlan` every layer shares, from vLLM's host copies only (no device reads).

A layer's forward runs attention first (past-only: pages + tail + the chunk itself), then stores the chunk
(completed blocks quantized into pages, the rest into the tail). The upper layer of a cross-layer pair reads
the lower layer's pages at the same block ids; both must see the same plan, which the impl checks.

CUDA graphs: decode steps (one token per request) are captured whole (``UNIFORM_SINGLE_TOKEN_DECODE``) where the
Triton kernels run: their plan is vLLM's persistent ``query_start_loc`` and block table plus this worker's
fixed-address ``past_lens``/``tail_slot`` buffers, filled in place each step, and the store decides per row on the
device. Prefill and mixed steps run between vLLM's piecewise graphs.
"""

from __future__ import annotations

import os
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
    AttentionCGSupport,
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
from xquant_vllm.kernels import KERNELS_ENV, StepPlan, build_step_plan, paged_attention, store_kv
from xquant_vllm.layout import PageLayout, page_layout
from xquant_vllm.quant.rotation import rotate
from xquant_vllm.plugin import BACKEND_NAME, XQuantConfigError, engine_quant_config, num_tail_slots
from xquant_vllm.tail import FEED, TailSlots, install_runner_hooks
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


def device_store(device: torch.device) -> bool:
    """Whether decode steps store on the device (the Triton kernels run): the condition for CUDA graphs."""
    return device.type == "cuda" and os.environ.get(KERNELS_ENV, "auto") == "auto"


class StepPlanner:
    """Each step's :class:`StepPlan`, from vLLM's host copies (query starts, sequence lengths) and the rows' tail
    slots (:data:`xquant_vllm.tail.FEED`); what decode kernels read lives at fixed addresses, so captured graphs
    read the current step's."""

    STAGES = 4  # pinned staging buffers in turn: a copy in flight is never overwritten by the next steps

    def __init__(self, block_size: int, max_rows: int, scratch_slot: int, device: torch.device) -> None:
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.device = device
        self.device_store = device_store(device)
        self.rows = torch.zeros(2, max_rows, dtype=torch.int32, device=device)  # past_lens, tail_slot
        pin = device.type == "cuda"
        self._stages = [torch.zeros(2, max_rows, dtype=torch.int32, pin_memory=pin) for _ in range(self.STAGES)]
        self._turn = 0
        self._empty = torch.zeros(0, dtype=torch.int32, device=device)
        self._last: tuple[CommonAttentionMetadata, StepPlan] | None = None

    def plan(self, cm: CommonAttentionMetadata, capture: bool = False) -> StepPlan:
        """The step's plan; the builders of all attention groups get the same ``cm`` object within a step.

        ``capture``: a graph capture's dummy batch, which must leave the runner's report for the next real step.
        """
        if self._last is not None and self._last[0] is cm:
            return self._last[1]
        R, B = cm.num_reqs, self.block_size
        if R > self.rows.shape[1]:
            raise ValueError(f"num_reqs={R}: more batch rows than the {self.rows.shape[1]} the planner was sized for")
        qsl = cm.query_start_loc_cpu[: R + 1]
        seq = cm.seq_lens_cpu_upper_bound  # exact without speculative decoding, which the plugin refuses
        seq = cm.seq_lens[:R].cpu() if seq is None else seq[:R]
        past = (seq - (qsl[1:] - qsl[:-1])).clamp_(min=0).to(torch.int32)  # padding rows: no token, no past
        row_slots = None if capture else FEED.take()
        stage = self._stages[self._turn]
        self._turn = (self._turn + 1) % self.STAGES
        stage[0, :R] = past
        stage[1, :R] = self.scratch_slot  # dummy runs (no report) and padding rows: a slot no request owns
        if row_slots:
            stage[1, : len(row_slots)] = torch.tensor(row_slots, dtype=torch.int32)
        block_table = cm.block_table_tensor[:R]
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table_tensor: expected int32 block ids, got {block_table.dtype}")
        max_past = int(past.max()) if R else 0
        if self.device_store and cm.max_query_len <= 1:
            rows = self.rows[:, :R]
            rows.copy_(stage[:, :R], non_blocking=True)
            empty = self._empty
            plan = StepPlan(
                block_size=B, query_start_loc=cm.query_start_loc[: R + 1], past_lens=rows[0], block_table=block_table,
                tail_slot=rows[1], full_block_ids=empty, full_tail_slot=empty, full_tail_count=empty,
                full_row_start=empty, tail_rows=empty, tail_dst=empty, max_query_len=cm.max_query_len,
                max_past_len=max_past, device_store=True,
            )  # fmt: skip
        else:
            plan = build_step_plan(qsl, past, block_table, stage[1, :R].clone(), B).to(self.device, block_table)
        self._last = (cm, plan)
        return plan


class WorkerState:
    """Per engine and worker, made once at the first builder: each xquant layer's tails, the tail slots, the
    planner. Everything it allocates exists before vLLM captures graphs; the tails' bytes were taken out of the KV
    budget (:func:`xquant_vllm.plugin.tail_reserved_bytes`). The last tail slot is the scratch slot of rows that
    belong to no request (dummy runs)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        cfg = engine_quant_config(vllm_config)
        sched = vllm_config.scheduler_config
        self.config = weakref.ref(vllm_config)
        num_slots = num_tail_slots(vllm_config)
        self.slots = TailSlots(num_slots - 1)
        self.layers = _layer_states(vllm_config, cfg, num_slots, device)
        rows = max(sched.max_num_seqs, sched.max_num_batched_tokens)
        self.planner = StepPlanner(cfg.block_size, rows, num_slots - 1, device)
        install_runner_hooks()
        FEED.bind(vllm_config, self.slots)


def _layer_states(vllm_config: VllmConfig, cfg: QuantConfig, num_slots: int, device: torch.device) -> dict[str, LayerState]:
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
        shape = (num_slots, layer.num_kv_heads, cfg.block_size, cfg.head_size)
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


_WORKERS: weakref.WeakValueDictionary[int, WorkerState] = weakref.WeakValueDictionary()


def worker_state(vllm_config: VllmConfig, device: torch.device) -> WorkerState:
    """One state per engine (per ``VllmConfig`` object) in this process, shared by all its builders."""
    state = _WORKERS.get(id(vllm_config))
    if state is None or state.config() is not vllm_config:
        state = WorkerState(vllm_config, device)
        _WORKERS[id(vllm_config)] = state
    return state


class XQuantMetadataBuilder(AttentionMetadataBuilder[XQuantMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(
        self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.worker = worker_state(vllm_config, device)
        missing = sorted(set(layer_names) - set(self.worker.layers))
        if missing:
            raise XQuantConfigError(f"layers {missing} are in an xquant KV-cache group but do not use xquant")

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: AttentionSpec) -> AttentionCGSupport:
        """Full graphs of decode steps on CUDA with the Triton kernels; the PyTorch path cannot be captured."""
        from vllm.platforms import current_platform

        return cls._cudagraph_support if device_store(torch.device(current_platform.device_type)) else AttentionCGSupport.NEVER

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> XQuantMetadata:
        return self._metadata(common_attn_metadata, capture=False)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> XQuantMetadata:
        """The plan of a captured batch fills the same buffers as every replay's (no request: rows on the scratch slot)."""
        return self._metadata(common_attn_metadata, capture=True)

    def _metadata(self, cm: CommonAttentionMetadata, capture: bool) -> XQuantMetadata:
        return XQuantMetadata(
            plan=self.worker.planner.plan(cm, capture),
            num_tokens=int(cm.query_start_loc_cpu[cm.num_reqs]),
            layers=self.worker.layers,
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
        q, k, v, out = query[:n], key[:n], value[:n], output[:n]
        # A rotated layer stores the codes of rotate(k) / rotate(v): attention runs in the rotated space, which
        # leaves the scores unchanged, and its output is rotated back (the rotation is its own inverse).
        if state.lq.rotate_k:
            q, k = rotate(q), rotate(k)
        if state.lq.rotate_v:
            v = rotate(v)
        paged_attention(
            q, k, v, pages, state.tail_k, state.tail_v, plan, state.lq, state.layout, self.scale, out,
            lower_pages, state.lower_layout,
        )  # fmt: skip
        store_kv(k, v, pages, state.tail_k, state.tail_v, plan, state.lq, state.layout)
        if state.lq.rotate_v:
            heads = out.view(n, -1, self.head_size)
            heads.copy_(rotate(heads))
        return output


def _pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """vLLM's ``[num_blocks, H, 1, page_bytes]`` view as the kernels' ``[num_blocks, H, page_bytes]``."""
    return kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], -1)

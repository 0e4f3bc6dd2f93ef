"""A transformers cache that runs the reference quantizers inside a Hugging Face model (quality measurements).

Each layer stores what the reference stores: code tensors and :class:`GroupMeta` per flushed run of tokens
(``xquant_vllm.quant.kv``), plus a full-precision tail. Semantics are those of ``xquant_vllm.quant.attention``:

* past-only: a chunk attends to the cache as it was before the chunk (quantized part + fp tail) and to its own
  tokens at full precision; what the chunk leaves behind is quantized at the start of the next forward, before
  that forward's chunk is appended, so the chunk itself never reads its own quantized tokens;
* cross-layer pairs: an upper layer that shares a tensor stores only its own metadata and dequantizes the codes
  its lower partner stored for the same tokens (the lower layer runs first in a forward, so they exist).

Two residual rules (``QuantConfig.residual_rule``):

* ``paged``: keys and values of a block of ``B = k_group`` tokens are quantized when it fills; the partial
  last block is the fp tail;
* ``reference`` (KIVI / XQuant code): keys are quantized in whole runs of ``R = residual`` tokens (0..R-1 fp
  keys); values keep exactly the newest ``R`` tokens fp and quantize each token that leaves that window.

An attention sink (``sink_tokens > 0``, a measurement of the harness, not a config field: the engine has no
sink yet) keeps the first tokens of every sequence at full precision in what attention reads; their codes are
still stored, as a page would hold them.

Reads are cheap: every layer keeps a buffer ``[batch, heads, capacity, D]`` in the model dtype whose first
tokens are the dequantized *mirror* of the stored codes (written once, when a run is quantized) and whose
remaining tokens are the fp tail. The mirror always equals ``dequantize(codes, meta)``
(:meth:`XQuantLayer.dequantized`). The batch (equal-length sequences) is folded into the head axis for the
quantizers: every group lies within one sequence and one head, so this changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache, DynamicLayer

from xquant_vllm.config import LayerQuant, QuantConfig
from xquant_vllm.quant.groups import GroupMeta
from xquant_vllm.quant.kv import (
    dequantize_keys,
    dequantize_values,
    key_meta,
    quantize_keys,
    quantize_values,
    value_meta,
)
from xquant_vllm.quant.rotation import rotate


@dataclass
class StoredRun:
    """One quantized run of tokens ``[start, end)`` of one tensor; ``codes`` is None for a shared tensor."""

    start: int
    end: int
    codes: torch.Tensor | None
    meta: GroupMeta


def cat_meta(metas: list[GroupMeta]) -> GroupMeta:
    """Join the metadata of consecutive runs (all forms have the run axis first)."""
    return GroupMeta(
        **{
            f.name: None if getattr(metas[0], f.name) is None else torch.cat([getattr(m, f.name) for m in metas])
            for f in fields(GroupMeta)
        }
    )


class XQuantLayer(DynamicLayer):
    """One attention layer's quantized cache (see the module docstring)."""

    def __init__(self, lq: LayerQuant, cfg: QuantConfig, lower: XQuantLayer | None = None, sink_tokens: int = 0):
        super().__init__()
        self.sink_tokens = sink_tokens
        if (lq.k_shared or lq.v_shared) and lower is None:
            raise ValueError(f"layer {lq.index} shares codes: it needs its lower partner layer")
        self.lq, self.lower = lq, lower
        self.rule, self.residual = cfg.residual_rule, cfg.residual
        self.length = 0  # tokens held
        self.k_done = self.v_done = 0  # tokens quantized (the mirror spans [0, done))
        self.k_runs: list[StoredRun] = []
        self.v_runs: list[StoredRun] = []

    # ---- transformers API -------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.k_buf = key_states.new_empty(b, h, 0, d)
        self.v_buf = value_states.new_empty(b, h, 0, d)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize what the previous chunk left behind, append this chunk at full precision, return the history."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.flush()
        q = key_states.shape[-2]
        self._reserve(self.length + q)
        self.k_buf[:, :, self.length : self.length + q] = key_states
        self.v_buf[:, :, self.length : self.length + q] = value_states
        self.length += q
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    # ---- quantization -----------------------------------------------------------------------------
    def due(self) -> tuple[int, int]:
        """How many tokens (keys, values) should be quantized now: the rest is the fp tail."""
        if self.rule == "paged":
            B = self.lq.k_group
            n = self.length // B * B
            return n, n
        R = self.residual
        return self.k_done + (self.length - self.k_done) // R * R, max(self.v_done, self.length - R)

    def flush(self) -> None:
        """Quantize the tokens due (keys, then values), append their runs and overwrite them with the mirror."""
        if not self.is_initialized:
            return
        k_end, v_end = self.due()
        if k_end > self.k_done:
            self._quantize("k", self.k_done, k_end)
            self.k_done = k_end
        if v_end > self.v_done:
            self._quantize("v", self.v_done, v_end)
            self.v_done = v_end

    def _quantize(self, tensor: str, a: int, b: int) -> None:
        """Store tokens ``[a, b)`` of ``tensor`` as codes + meta (meta only if shared) and write their mirror.

        A rotated tensor stores the codes of ``rotate(x)``; its mirror is rotated back (the rotation is its own
        inverse), which is what the engine's attention computes on rotated queries and outputs.
        """
        quantize, meta_of, dequantize = _OPS[tensor]
        rotated = getattr(self.lq, f"rotate_{tensor}")
        buf = self._buf(tensor)
        x = _fold(buf[:, :, a:b])
        if rotated:
            x = rotate(x)
        if getattr(self.lq, f"{tensor}_shared"):
            codes, meta = None, meta_of(x, self.lq)
            read = self.lower.run_codes(tensor, a, b)
        else:
            codes, meta = quantize(x, self.lq)
            read = codes
        self._runs(tensor).append(StoredRun(a, b, codes, meta))
        mirror = dequantize(read, meta, self.lq, self.dtype)
        sink = buf[:, :, a : min(b, self.sink_tokens)].clone()
        buf[:, :, a:b] = _unfold(rotate(mirror) if rotated else mirror, buf.shape[0])
        buf[:, :, a : a + sink.shape[2]] = sink

    def _buf(self, tensor: str) -> torch.Tensor:
        return self.k_buf if tensor == "k" else self.v_buf

    def _runs(self, tensor: str) -> list[StoredRun]:
        return self.k_runs if tensor == "k" else self.v_runs

    def run_codes(self, tensor: str, a: int, b: int) -> torch.Tensor:
        """Codes this layer stored for exactly the tokens ``[a, b)`` (what its upper partner borrows)."""
        runs = self._runs(tensor)
        if not runs or (runs[-1].start, runs[-1].end) != (a, b) or runs[-1].codes is None:
            upper = self.lq.index + 1
            raise ValueError(
                f"layer {self.lq.index} has no {tensor} codes for tokens [{a}, {b}) to lend to layer {upper}"
            )
        return runs[-1].codes

    # ---- inspection (tests, accounting) -------------------------------------------------------------
    def stored(self, tensor: str) -> tuple[torch.Tensor | None, GroupMeta]:
        """All stored codes (None if shared) and metadata of ``tensor`` ('k' or 'v'), batch folded into heads."""
        runs = self._runs(tensor)
        codes = None if runs[0].codes is None else torch.cat([r.codes for r in runs])
        return codes, cat_meta([r.meta for r in runs])

    def dequantized(self, tensor: str) -> torch.Tensor:
        """``dequantize(codes, meta)`` of everything quantized so far (rotated back), ``[batch, heads, tokens, D]``."""
        codes, meta = self.stored(tensor)
        if codes is None:
            codes, _ = self.lower.stored(tensor)
        x = _OPS[tensor][2](codes, meta, self.lq, self.dtype)
        return _unfold(rotate(x) if getattr(self.lq, f"rotate_{tensor}") else x, self.k_buf.shape[0])

    def mirror(self, tensor: str) -> torch.Tensor:
        return self._buf(tensor)[:, :, : self.k_done if tensor == "k" else self.v_done]

    def _reserve(self, n: int) -> None:
        """Grow the buffers geometrically so appending is amortized O(1) per token."""
        cap = self.k_buf.shape[2]
        if n <= cap:
            return
        new = max(n, 2 * cap, 256)
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            buf = old.new_empty(old.shape[0], old.shape[1], new, old.shape[3])
            buf[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, buf)


_OPS = {  # tensor -> (quantize, metadata alone, dequantize) of xquant_vllm.quant.kv
    "k": (quantize_keys, key_meta, dequantize_keys),
    "v": (quantize_values, value_meta, dequantize_values),
}


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, T, D]`` -> ``[T, batch*heads, D]`` (the quantizers' layout)."""
    b, h, t, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(t, b * h, d)


def _unfold(x: torch.Tensor, batch: int) -> torch.Tensor:
    t, bh, d = x.shape
    return x.reshape(t, batch, bh // batch, d).permute(1, 2, 0, 3)


class XQuantCache(Cache):
    """Quantized KV cache for a decoder of ``cfg.num_layers`` full-attention layers (pass as ``past_key_values``)."""

    def __init__(self, cfg: QuantConfig, sink_tokens: int = 0):
        layers: list[XQuantLayer] = []
        for lq in cfg.layers():
            lower = layers[-1] if lq.k_shared or lq.v_shared else None
            layers.append(XQuantLayer(lq, cfg, lower, sink_tokens))
        super().__init__(layers=layers)
        self.cfg = cfg

    def flush(self) -> None:
        """Quantize everything due now (lower layers first), as the next forward would; for inspection."""
        for layer in self.layers:
            layer.flush()

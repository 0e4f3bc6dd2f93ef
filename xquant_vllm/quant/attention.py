"""Reference attention over a quantized cache, one request at a time (the semantics every kernel follows).

Paged rule, past-only (spec section 2): a request that already holds ``past_len`` tokens and computes a chunk
of ``q_len`` new tokens attends to

* the first ``(past_len // B) * B`` tokens *quantized* (whole blocks of ``B = k_group`` tokens),
* the remaining ``past_len % B`` tokens (the tail) at full precision,
* its own chunk at full precision, causally.

Only what the chunk leaves behind is quantized, after attention. A decode step is a chunk of one token.

A layer with ``rotate_k`` / ``rotate_v`` (:mod:`xquant_vllm.quant.rotation`) is rotated *around* this semantics,
as the backend rotates around the kernels: queries and keys (values) enter rotated, the output of rotated values
leaves rotated back; :func:`rotated_reference_attention` does that.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from xquant_vllm.config import LayerQuant
from xquant_vllm.quant.kv import dequantize_layer, quantize_layer
from xquant_vllm.quant.rotation import rotate


def cached_history(
    k: torch.Tensor, v: torch.Tensor, lq: LayerQuant, lower: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache returns for a history ``k, v`` [T, H, D]: whole blocks dequantized, the tail as is.

    ``lower`` is the lower layer's history (same length) when this layer borrows its codes.
    """
    B = lq.k_group
    n = (k.shape[0] // B) * B
    if n == 0:
        return k, v
    q = quantize_layer(k[:n], v[:n], lq)
    lower_q = None
    if lq.k_shared or lq.v_shared:
        if lower is None:
            raise ValueError(f"layer {lq.index} shares codes: pass the lower layer's history")
        lower_q = quantize_layer(lower[0][:n], lower[1][:n], _lower_of(lq))
    kh, vh = dequantize_layer(q, lq, k.dtype, lower_q)
    return torch.cat([kh, k[n:]]), torch.cat([vh, v[n:]])


def _lower_of(lq: LayerQuant) -> LayerQuant:
    """The lower partner stores codes with the same bits (validated by the config); etas do not matter."""
    return replace(lq, index=lq.index - 1, k_shared=False, v_shared=False)


def reference_attention(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_len: int,
    lq: LayerQuant,
    scale: float,
    lower: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention output [q_len, Hq, D] for one request.

    ``query`` [q_len, Hq, D]; ``k, v`` [past_len + q_len, H, D] hold the request's whole history including
    the chunk (keys after RoPE); ``lower`` the lower layer's history for a shared layer.
    """
    q_len = query.shape[0]
    assert k.shape[0] == past_len + q_len
    lower_past = None if lower is None else (lower[0][:past_len], lower[1][:past_len])
    pk, pv = cached_history(k[:past_len], v[:past_len], lq, lower_past)
    keys = torch.cat([pk, k[past_len:]]).float()
    values = torch.cat([pv, v[past_len:]]).float()
    rows = torch.arange(q_len).unsqueeze(1)
    cols = torch.arange(past_len + q_len).unsqueeze(0)
    mask = cols <= rows + past_len  # [q_len, T]
    out = F.scaled_dot_product_attention(
        query.float().transpose(0, 1),  # [Hq, q_len, D]
        keys.transpose(0, 1),
        values.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1).to(query.dtype)


def rotated_reference_attention(
    query: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_len: int,
    lq: LayerQuant,
    scale: float,
    lower: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`reference_attention` of a layer that rotates its keys and/or values (the engine's semantics)."""
    if lq.rotate_k:
        query, k = rotate(query), rotate(k)
    if lq.rotate_v:
        v = rotate(v)
    if lower is not None:
        lower = (rotate(lower[0]) if lq.rotate_k else lower[0], rotate(lower[1]) if lq.rotate_v else lower[1])
    out = reference_attention(query, k, v, past_len, lq, scale, lower)
    return rotate(out) if lq.rotate_v else out

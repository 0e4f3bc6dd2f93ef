"""KIVI grouping of one layer's K and V (spec section 2) and XQuant's cross-layer pairs (section 5).

Tensors come as the cache holds them: ``[T, H, D]`` (tokens, KV heads, channels), keys after RoPE.

* Keys are quantized **per channel**: for each head and channel, runs of ``G_k`` consecutive tokens form a
  group. Codes are returned as ``[T / G_k, H, D, G_k]`` (one row of ``G_k`` token codes per channel).
* Values are quantized **per token**: for each token and head, runs of ``G_v`` consecutive channels form a
  group. Codes are returned as ``[T, H, D / G_v, G_v]``.

With 8-bit metadata the super range covers one block of ``G_k`` tokens and one head, for keys and values
alike (what one paged block holds), so ``T`` must then be a multiple of ``G_k`` for values too.
The upper layer of a cross-layer pair calls :func:`key_meta` / :func:`value_meta` on its own tensor and
dequantizes the lower layer's codes with that metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xquant_vllm.config import LayerQuant
from xquant_vllm.quant.groups import GroupMeta, compute_meta, dequantize_groups, quantize_groups


def _key_groups(k: torch.Tensor, group: int) -> torch.Tensor:
    T, H, D = k.shape
    if T % group:
        raise ValueError(f"keys: {T} tokens is not a whole number of key groups of {group}")
    return k.reshape(T // group, group, H, D).permute(0, 2, 3, 1)  # [nb, H, D, G]


def _keys_from_groups(x: torch.Tensor) -> torch.Tensor:
    nb, H, D, G = x.shape
    return x.permute(0, 3, 1, 2).reshape(nb * G, H, D)


def _value_groups(v: torch.Tensor, group: int, block: int | None) -> torch.Tensor:
    """[T, H, D] -> [T, H, D/G, G], or [nb, H, block*D/G, G] when a super range spans a block."""
    T, H, D = v.shape
    if block is None:
        return v.reshape(T, H, D // group, group)
    if T % block:
        raise ValueError(f"values: {T} tokens is not a whole number of blocks of {block}")
    return v.reshape(T // block, block, H, D // group, group).permute(0, 2, 1, 3, 4).reshape(T // block, H, -1, group)


def _values_from_groups(x: torch.Tensor, head_size: int, block: int | None) -> torch.Tensor:
    if block is None:
        T, H = x.shape[:2]
        return x.reshape(T, H, head_size)
    nb, H = x.shape[:2]
    return x.reshape(nb, H, block, head_size).permute(0, 2, 1, 3).reshape(nb * block, H, head_size)


def _value_block(lq: LayerQuant) -> int | None:
    return lq.k_group if lq.meta_bits == 8 else None


def quantize_keys(k: torch.Tensor, lq: LayerQuant) -> tuple[torch.Tensor, GroupMeta]:
    return quantize_groups(_key_groups(k, lq.k_group), lq.k_bits, lq.k_eta, lq.meta_bits)


def key_meta(k: torch.Tensor, lq: LayerQuant) -> GroupMeta:
    return compute_meta(_key_groups(k, lq.k_group), lq.k_bits, lq.k_eta, lq.meta_bits)


def dequantize_keys(codes: torch.Tensor, meta: GroupMeta, lq: LayerQuant, dtype: torch.dtype) -> torch.Tensor:
    return _keys_from_groups(dequantize_groups(codes, meta, lq.k_bits, lq.k_eta, dtype))


def quantize_values(v: torch.Tensor, lq: LayerQuant) -> tuple[torch.Tensor, GroupMeta]:
    block = _value_block(lq)
    codes, meta = quantize_groups(_value_groups(v, lq.v_group, block), lq.v_bits, lq.v_eta, lq.meta_bits)
    return _unblock_value_codes(codes, lq, block), meta


def value_meta(v: torch.Tensor, lq: LayerQuant) -> GroupMeta:
    return compute_meta(_value_groups(v, lq.v_group, _value_block(lq)), lq.v_bits, lq.v_eta, lq.meta_bits)


def _unblock_value_codes(codes: torch.Tensor, lq: LayerQuant, block: int | None) -> torch.Tensor:
    """Value codes are always returned per token: [T, H, D/G, G]."""
    v = _values_from_groups(codes, lq.head_size, block)
    return v.reshape(v.shape[0], v.shape[1], lq.head_size // lq.v_group, lq.v_group)


def dequantize_values(codes: torch.Tensor, meta: GroupMeta, lq: LayerQuant, dtype: torch.dtype) -> torch.Tensor:
    block = _value_block(lq)
    T, H = codes.shape[:2]
    grouped = _value_groups(codes.reshape(T, H, lq.head_size), lq.v_group, block)
    return _values_from_groups(dequantize_groups(grouped, meta, lq.v_bits, lq.v_eta, dtype), lq.head_size, block)


@dataclass
class QuantizedKV:
    """One layer's quantized tokens: codes are None where the layer borrows its lower partner's."""

    k_codes: torch.Tensor | None
    k_meta: GroupMeta
    v_codes: torch.Tensor | None
    v_meta: GroupMeta


def quantize_layer(k: torch.Tensor, v: torch.Tensor, lq: LayerQuant) -> QuantizedKV:
    """Quantize whole key groups of one layer; a shared tensor keeps only its own metadata."""
    if lq.k_shared:
        k_codes, k_m = None, key_meta(k, lq)
    else:
        k_codes, k_m = quantize_keys(k, lq)
    if lq.v_shared:
        v_codes, v_m = None, value_meta(v, lq)
    else:
        v_codes, v_m = quantize_values(v, lq)
    return QuantizedKV(k_codes, k_m, v_codes, v_m)


def dequantize_layer(
    q: QuantizedKV, lq: LayerQuant, dtype: torch.dtype, lower: QuantizedKV | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K_hat, V_hat)`` [T, H, D]; a shared tensor reads ``lower``'s codes with its own metadata."""
    k_codes = q.k_codes if q.k_codes is not None else _borrow(lower, "k_codes", lq)
    v_codes = q.v_codes if q.v_codes is not None else _borrow(lower, "v_codes", lq)
    return dequantize_keys(k_codes, q.k_meta, lq, dtype), dequantize_values(v_codes, q.v_meta, lq, dtype)


def _borrow(lower: QuantizedKV | None, name: str, lq: LayerQuant) -> torch.Tensor:
    codes = None if lower is None else getattr(lower, name)
    if codes is None:
        raise ValueError(f"layer {lq.index} shares {name} with layer {lq.index - 1}, which has none to lend")
    return codes

"""Quantize-and-store: the Triton kernels behind ``store_kv`` on CUDA (bit-exact with the reference).

Launch 1, one program per (completed block, KV head): gather the block's ``B`` tokens (the first
``full_tail_count`` from the request's tail slot, the rest from this step's rows), then per tensor

* keys: per-channel (min, max) over the ``B`` tokens, values: per-token (min, max) over each group of ``G_v``
  channels;
* metadata (``_quantizer_range``): 16-bit ``s_cal, z_cal`` in the model dtype, or 8-bit min/max codes against
  the block's fp32 super range, stepped outward exactly like ``groups._encode_minmax``;
* codes ``clamp(rint((x - mn) / s), 0, 2^b - 1)`` packed LSB-first (``quant/packing.py``) into the page.

The fp32 operations are those of ``xquant_vllm/quant/groups.py`` in the same order: IEEE division
(``div_rn``), round half to even, no fused multiply-add (compiled with ``enable_fp_fusion=False``). The upper
layer of a cross-layer pair writes only the metadata of a shared tensor. Pages have no padding for the
supported shapes (every section is a multiple of 16 bytes), so a page equals ``write_pages``' byte for byte.

Launch 2, one program per (tail row, KV head): copy the rows that stay in a partial block into the tail. It
runs after launch 1, which may still read the tail slot it overwrites.

A decode plan (``plan.device_store``) takes one launch instead, one program per (request, KV head), sized by the
batch alone: the row at ``past % B == B - 1`` quantizes its block (``B - 1`` tokens from its tail slot and
itself), any other row joins its tail. Within a decode step no row's tail slot is another's, so the one launch
has no order to keep.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from xquant_vllm.config import LayerQuant
from xquant_vllm.layout import PageLayout

from .dequant import calibrate, decode_minmax
from .plan import StepPlan

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _rint(x):
    """Round half to even, for ``0 <= x < 2^22``: adding 1.5 * 2^23 leaves no fraction bits in fp32.

    Portable where ``libdevice.rint`` is not (the interpreter); exact without fast-math reassociation.
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> ``DTYPE``, round to nearest even. bf16 is rounded by hand: the interpreter truncates."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # finite x: carries into the exponent as RNE does
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _codes(x, mn, mx, BITS: tl.constexpr):
    """``clamp(rint((x - mn) / s), 0, 2^b - 1)`` with ``s = (mx - mn) / (2^b - 1)``; 0 where ``s == 0``.

    ``mn, mx`` are broadcast to ``x``. Clamping before rounding gives the same codes and keeps ``_rint`` in range.
    """
    top: tl.constexpr = float((1 << BITS) - 1)
    s = tl.math.div_rn(mx - mn, top)
    ratio = tl.math.div_rn(x - mn, tl.where(s > 0, s, 1.0))
    q = _rint(tl.minimum(tl.maximum(ratio, 0.0), top))
    return tl.where(s > 0, q, 0.0).to(tl.int32)


@triton.jit
def _quantizer_range(
    mn, mx, page, meta_off, super_off, idx, N: tl.constexpr, BITS: tl.constexpr, eta, one_minus_2eta,
    META_BITS: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """Store the metadata of one section's groups ``idx`` (``N`` in all); return the range codes use.

    16-bit: ``s_cal[N]``, ``z_cal[N]`` in ``DTYPE``; the range is ``(mn, mx)``. 8-bit: fp32 ``lo, hi`` at
    ``super_off``, uint8 ``min_q[N]``, ``max_q[N]``; the range is their decoded ``(min, max)``.
    """
    if META_BITS == 8:
        lo = tl.min(mn)
        hi = tl.max(mx)
        step = tl.math.div_rn(hi - lo, 255.0)
        safe = tl.where(step > 0, step, 1.0)
        min_q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(mn - lo, safe)), 0.0), 255.0)
        max_q = tl.minimum(tl.maximum(tl.ceil(tl.math.div_rn(mx - lo, safe)), 0.0), 255.0)
        dmn, dmx = decode_minmax(lo, hi, min_q, max_q)
        min_q = tl.where((dmn > mn) & (min_q > 0), min_q - 1.0, min_q)
        max_q = tl.where((dmx < mx) & (max_q < 255), max_q + 1.0, max_q)
        sup = (page + super_off).to(tl.pointer_type(tl.float32))
        tl.store(sup, lo)
        tl.store(sup + 1, hi)
        tl.store(page + meta_off + idx, min_q.to(tl.uint8))
        tl.store(page + meta_off + N + idx, max_q.to(tl.uint8))
        return decode_minmax(lo, hi, min_q, max_q)
    else:
        s_cal, z_cal = calibrate(mn, mx, BITS, eta, one_minus_2eta)
        meta = (page + meta_off).to(tl.pointer_type(DTYPE))
        tl.store(meta + idx, _round_to(s_cal, DTYPE))
        tl.store(meta + N + idx, _round_to(z_cal, DTYPE))
        return mn, mx


@triton.jit
def _store_packed(dst, codes, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr):
    """Pack codes ``[R, C]`` along rows, LSB first (``quant/packing.py``), into ``R * C * BITS / 8`` bytes."""
    PER_BYTE: tl.constexpr = 8 // BITS
    ROW_BYTES: tl.constexpr = C // PER_BYTE
    shifts = tl.arange(0, PER_BYTE) * BITS
    grouped = tl.reshape(codes, (R, ROW_BYTES, PER_BYTE))
    packed = tl.sum(grouped << shifts[None, None, :], axis=2)  # disjoint bits: the sum is an OR
    off = tl.arange(0, R)[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]
    tl.store(dst + off, packed.to(tl.uint8))


@triton.jit
def _load_block(new_ptr, row_stride, head_off, tail, from_tail, rows, B: tl.constexpr, D: tl.constexpr):
    """fp32 ``[B, D]``: token ``t`` from the tail slot at ``tail`` where ``from_tail[t]``, else from ``rows[t]``."""
    t = tl.arange(0, B)[:, None]
    d = tl.arange(0, D)[None, :]
    old = tl.load(tail + t * D + d, mask=from_tail[:, None], other=0.0)
    new = tl.load(new_ptr + rows[:, None] * row_stride + head_off + d, mask=~from_tail[:, None], other=0.0)
    return tl.where(from_tail[:, None], old, new).to(tl.float32)


@triton.jit
def _quantize_block(
    key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, t_ss, t_sh, pages_ptr, p_sb, p_sh,
    blk, slot, count, row_start, h, k_eta, k_ome, v_eta, v_ome,
    B: tl.constexpr, D: tl.constexpr, NV: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    META_BITS: tl.constexpr, DTYPE: tl.constexpr,
    SUPER_OFF: tl.constexpr, KC_OFF: tl.constexpr, VC_OFF: tl.constexpr, KM_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
):  # fmt: skip
    """Quantize block ``blk`` of KV head ``h`` into its page: its first ``count`` tokens from tail ``slot``, the rest
    from the rows starting at ``row_start``."""
    t = tl.arange(0, B)
    from_tail = t < count
    rows = (row_start + t - count).to(tl.int64)
    page = pages_ptr + blk * p_sb + h * p_sh
    tail_off = slot * t_ss + h * t_sh

    # Keys: groups are channels (over the block's tokens), codes stored [D, B].
    xk = _load_block(key_ptr, k_sr, h * k_sh, tail_k_ptr + tail_off, from_tail, rows, B, D)
    d = tl.arange(0, D)
    kmn, kmx = _quantizer_range(
        tl.min(xk, 0), tl.max(xk, 0), page, KM_OFF, SUPER_OFF, d, D, K_BITS, k_eta, k_ome, META_BITS, DTYPE
    )
    if KC_OFF >= 0:
        codes = _codes(xk, kmn[None, :], kmx[None, :], K_BITS)
        _store_packed(page + KC_OFF, tl.trans(codes), D, B, K_BITS)

    # Values: groups are runs of D / NV channels of one token, codes stored [B, D].
    xv = tl.reshape(
        _load_block(value_ptr, v_sr, h * v_sh, tail_v_ptr + tail_off, from_tail, rows, B, D), (B, NV, D // NV)
    )
    g = t[:, None] * NV + tl.arange(0, NV)[None, :]
    vmn, vmx = _quantizer_range(
        tl.min(xv, 2), tl.max(xv, 2), page, VM_OFF, SUPER_OFF + 8, g, B * NV, V_BITS, v_eta, v_ome, META_BITS, DTYPE
    )
    if VC_OFF >= 0:
        codes = _codes(xv, vmn[:, :, None], vmx[:, :, None], V_BITS)
        _store_packed(page + VC_OFF, tl.reshape(codes, (B, D)), B, D, V_BITS)


@triton.jit
def _store_blocks_kernel(
    key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh,
    tail_k_ptr, tail_v_ptr, t_ss, t_sh,
    pages_ptr, p_sb, p_sh,
    block_ids, tail_slots, tail_counts, row_starts,
    k_eta, k_ome, v_eta, v_ome,
    B: tl.constexpr, D: tl.constexpr, NV: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    META_BITS: tl.constexpr, DTYPE: tl.constexpr,
    SUPER_OFF: tl.constexpr, KC_OFF: tl.constexpr, VC_OFF: tl.constexpr, KM_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    _quantize_block(
        key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, t_ss, t_sh, pages_ptr, p_sb, p_sh,
        tl.load(block_ids + i).to(tl.int64), tl.load(tail_slots + i).to(tl.int64), tl.load(tail_counts + i),
        tl.load(row_starts + i), tl.program_id(1), k_eta, k_ome, v_eta, v_ome,
        B, D, NV, K_BITS, V_BITS, META_BITS, DTYPE, SUPER_OFF, KC_OFF, VC_OFF, KM_OFF, VM_OFF,
    )  # fmt: skip


@triton.jit
def _copy_row(key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, row, off, h, D: tl.constexpr):
    """Row ``row`` of KV head ``h`` into the tails at element offset ``off``."""
    d = tl.arange(0, D)
    tl.store(tail_k_ptr + off + d, tl.load(key_ptr + row * k_sr + h * k_sh + d))
    tl.store(tail_v_ptr + off + d, tl.load(value_ptr + row * v_sr + h * v_sh + d))


@triton.jit
def _store_decode_kernel(
    key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh,
    tail_k_ptr, tail_v_ptr, t_ss, t_sh,
    pages_ptr, p_sb, p_sh,
    qsl_ptr, past_ptr, bt_ptr, bt_stride, slot_ptr,
    k_eta, k_ome, v_eta, v_ome,
    B: tl.constexpr, D: tl.constexpr, NV: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    META_BITS: tl.constexpr, DTYPE: tl.constexpr,
    SUPER_OFF: tl.constexpr, KC_OFF: tl.constexpr, VC_OFF: tl.constexpr, KM_OFF: tl.constexpr,
    VM_OFF: tl.constexpr,
):  # fmt: skip
    """One program per (request, KV head) of a decode step: its one row completes its block (quantized from the
    tail and the row) or joins the tail. Rows without a token (padding of a captured batch) do nothing."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(qsl_ptr + r)
    if tl.load(qsl_ptr + r + 1) - row == 1:
        pos = tl.load(past_ptr + r)
        slot = tl.load(slot_ptr + r).to(tl.int64)
        if pos % B == B - 1:
            blk = tl.load(bt_ptr + r.to(tl.int64) * bt_stride + pos // B).to(tl.int64)
            _quantize_block(
                key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, t_ss, t_sh, pages_ptr, p_sb,
                p_sh, blk, slot, B - 1, row, h, k_eta, k_ome, v_eta, v_ome,
                B, D, NV, K_BITS, V_BITS, META_BITS, DTYPE, SUPER_OFF, KC_OFF, VC_OFF, KM_OFF, VM_OFF,
            )  # fmt: skip
        else:
            off = slot * t_ss + h * t_sh + (pos % B) * D
            _copy_row(key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, row.to(tl.int64), off, h, D)


@triton.jit
def _store_tail_kernel(
    key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, t_ss, t_sh, tail_rows, tail_dst,
    B: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    h = tl.program_id(1)
    dst = tl.load(tail_dst + i).to(tl.int64)
    off = (dst // B) * t_ss + h * t_sh + (dst % B) * D
    row = tl.load(tail_rows + i).to(tl.int64)
    _copy_row(key_ptr, k_sr, k_sh, value_ptr, v_sr, v_sh, tail_k_ptr, tail_v_ptr, row, off, h, D)


@functools.cache
def _calibration(eta: float) -> tuple[float, float]:
    """``(eta, 1 - 2 eta)``, each rounded once to fp32 as the reference's ``torch.tensor(x, dtype=float32)``."""
    return float(torch.tensor(eta, dtype=torch.float32)), float(torch.tensor(1.0 - 2.0 * eta, dtype=torch.float32))


def _check(
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    B: int,
    D: int,
) -> None:
    if B & (B - 1):
        raise ValueError(f"k_group={B}: the Triton store needs a power-of-two block")
    for name, x in (("key", key), ("value", value), ("pages", pages)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous, strides {tuple(x.stride())}")
    if tail_k.stride() != tail_v.stride() or tail_k.stride()[-2:] != (D, 1):
        raise ValueError(
            f"tail_k/tail_v: need equal strides ending in ({D}, 1), got {tail_k.stride()} / {tail_v.stride()}"
        )
    if key.dtype not in TL_DTYPES or tail_k.dtype != key.dtype:
        raise ValueError(f"key/tail dtypes {key.dtype}/{tail_k.dtype}: need one of {list(TL_DTYPES)} for both")


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan: StepPlan,
    lq: LayerQuant,
    layout: PageLayout,
) -> None:
    """``store_kv`` on CUDA (or under ``TRITON_INTERPRET=1``): see the module docstring."""
    B, D, H = plan.block_size, layout.head_size, key.shape[1]
    _check(key, value, pages, tail_k, tail_v, B, D)
    rows = (key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1))
    tails = (tail_k, tail_v, tail_k.stride(0), tail_k.stride(1))
    quant = dict(
        B=B, D=D, NV=layout.v_groups, K_BITS=layout.k_bits, V_BITS=layout.v_bits,
        META_BITS=layout.meta_bits, DTYPE=TL_DTYPES[key.dtype],
        SUPER_OFF=layout.super_off, KC_OFF=layout.k_codes_off, VC_OFF=layout.v_codes_off,
        KM_OFF=layout.k_meta_off, VM_OFF=layout.v_meta_off,
        enable_fp_fusion=False,
    )  # fmt: skip
    etas = (*_calibration(lq.k_eta), *_calibration(lq.v_eta))
    if plan.device_store:  # one launch, sized by the batch alone: capturable
        if plan.max_query_len > 1:
            raise ValueError(f"plan.device_store needs a decode step (max_query_len {plan.max_query_len} > 1)")
        _store_decode_kernel[(plan.num_reqs, H)](
            *rows, *tails, pages, pages.stride(0), pages.stride(1),
            plan.query_start_loc, plan.past_lens, plan.block_table, plan.block_table.stride(0), plan.tail_slot,
            *etas, **quant,
        )  # fmt: skip
        return
    nf = plan.full_block_ids.numel()
    if nf:
        _store_blocks_kernel[(nf, H)](
            *rows, *tails, pages, pages.stride(0), pages.stride(1),
            plan.full_block_ids, plan.full_tail_slot, plan.full_tail_count, plan.full_row_start, *etas, **quant,
        )  # fmt: skip
    nt = plan.tail_rows.numel()
    if nt:
        _store_tail_kernel[(nt, H)](*rows, *tails, plan.tail_rows, plan.tail_dst, B=B, D=D)

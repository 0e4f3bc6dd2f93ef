"""Decode attention over the quantized pages: one query token per request, a launch that CUDA graphs can capture.

One program handles request ``r``, KV head ``h`` and split ``s`` of the request's whole blocks. What is left per
code is unpacking (``dequant.unpack_words``: shift, mask-and-OR with the fp16 bias, one packed subtraction per
two codes), because the key scales and zero-points are folded into the query:

    q . k_t = sum_d (q_d s_d) c_dt + sum_d q_d z_d        (s, z: the page's per-channel key scale, zero-point)

A loop step spans ``NB`` pages, so the scaled query differs per page. Decode leaves most of an MMA's 16 rows
empty (``G`` = 3-4 query heads per KV head), so the scaled queries of the ``NB`` pages are stacked as rows:
row ``i`` is (page slot ``i // GP``, query head ``i % GP``). The MMA ``Q_scaled[M, D] @ codes[D, NB * B]``
scores every row against every page; a row keeps only its own page's columns. Each row runs its own online
softmax over the pages of its slot (slot ``k`` sees pages ``j0 + k`` of every step, an interleaved split of
the context), and the slots of a query head are merged by log-sum-exp after the loop. Values are dequantized
in registers (``c * s + z``, one packed FMA per two codes) and multiplied by the block-diagonal ``p``.

Key codes: by default (``KEY_SUBNORMAL``) a code field in the low byte of a 16-bit lane is read as the fp16
subnormal ``c * 2^(o - 24)`` (``dequant.unpack_words_subnormal``: one LOP3 with an immediate mask per two codes,
no fp16 bias and no subtraction) and each key column's score is multiplied by ``2^(24 - o)`` after the MMA;
exact, since the products stay far inside fp32's range and the tensor cores keep fp16 subnormals. Knobs:
the magic-number path (``KEY_SUBNORMAL = False``) and int8 codes times an int8-rounded query (``KEY_INT8``,
measured slower: the int8 MMA wants channel-contiguous bytes, the pages hold token-contiguous codes, and
Triton transposes the tile through shared memory; kernels_gpu_notes.md, run 6).

The tail (``past % B`` full-precision rows) and the step's own token are attended by split 0, which therefore
always has work; splits are merged by ``_combine_kernel`` (flash-decoding).

**Capturable launch.** The grid ``(R, H, S)`` and the scratch buffers depend only on tensor shapes (``R`` =
``plan.past_lens.shape[0]``, the padded batch; ``S`` from ``R``, ``H``, ``block_table.shape[1]`` and the
SM count), never on values held on the host. Each program reads its request's length on the device and takes
``ceil(n_full / S)`` blocks (at least ``MIN_BLOCKS_PER_SPLIT``); programs with nothing to read write an empty
partial and exit; requests with no query row (batch padding) exit. A caller that captures the launch in a
CUDA graph must keep fixed: the tensors' addresses and shapes (query, key, value, out, pages, tails, the
plan's ``query_start_loc``, ``past_lens``, ``block_table``, ``tail_slot``) and ``plan.max_query_len <= 1``;
the values inside them may change between replays.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dequant import (
    group_params,
    load_value_rows,
    load_words,
    pair_order,
    quad_order,
    subnormal_shift,
    unpack_words,
    unpack_words_int8,
    unpack_words_subnormal,
    value_tile,
)

LOG2E = 1.4426950408889634
MIN_BLOCKS_PER_SPLIT = 8  # below this a split's fixed cost (query, tail, merge) outweighs the parallelism
PROGRAMS_PER_SM = 8  # the splits aim at this many programs per SM: enough to hide the page loads' latency
MAX_SPLITS = 64
TILE_TOKENS = 128  # tokens per loop step (NB pages)
MAX_TILE_ELEMENTS = 128 * 128  # tokens x head size of one step: the unpacked tiles live in registers
KEY_SUBNORMAL = True  # launch_decode's default: key codes as fp16 subnormals (kernels_gpu_notes.md, run 6)
KEY_INT8 = 0  # launch_decode's default key path (0 fp16 codes, 1 int8 x rounded int8 query, 2 with the residual)


@triton.jit
def _online_update(s, shift, m_i, l_i):
    """Softmax bookkeeping for base-2 scores ``s + shift`` [N, M] (keys x stacked rows; masked entries of ``s``
    -inf; ``shift`` [M] a per-row constant, the folded key zero-points): ``(p, alpha, m, l)``. Adding ``shift``
    to the row maxima instead of to ``s`` keeps it out of the MMA's accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, 0) + shift)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no NaN from -inf - -inf
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s + (shift - m_safe)[None, :])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 0)


@triton.jit
def _attend_full_precision(q_t, acc_t, m_i, l_i, k_rows, v_rows, channels, col_ok, qk_scale, DOT_F32: tl.constexpr):
    """Attend to full-precision rows (the tail, the step's own token), transposed like the main loop: keys and
    values start at ``k_rows``/``v_rows`` [N]; ``q_t`` [D, M]; ``col_ok`` [N, M] says which (key, stacked row)
    pairs count; ``channels`` [D] is ``acc_t``'s row order. ``DOT_F32``: dots in fp32 (the CPU interpreter
    computes bf16 dots wrongly)."""
    rows_ok = tl.max(col_ok.to(tl.int32), 1) > 0
    k = tl.load(k_rows[:, None] + tl.arange(0, q_t.shape[0])[None, :], mask=rows_ok[:, None], other=0.0)
    if DOT_F32:
        q_t, k = q_t.to(tl.float32), k.to(tl.float32)
    s = tl.where(col_ok, tl.dot(k, q_t) * qk_scale, float("-inf"))
    p, alpha, m_i, l_i = _online_update(s, tl.zeros_like(m_i), m_i, l_i)
    v = tl.load(v_rows[None, :] + channels[:, None], mask=rows_ok[None, :], other=0.0)
    if DOT_F32:
        v = v.to(tl.float32)
    return acc_t * alpha[None, :] + tl.dot(v, p.to(v.dtype)), m_i, l_i


@triton.jit
def _key_meta(pages, ok, KEY_META_OFF: tl.constexpr, SUPER_OFF: tl.constexpr, D: tl.constexpr,
              META_BITS: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """Raw key metadata of the pages ``pages`` [1, SL] (byte pointers; zeros where ``ok``): ``(a, b, lo, hi)``
    as :func:`dequant.group_params` takes them, ``a, b`` [D, SL] and ``lo, hi`` [1, SL]."""
    d = tl.arange(0, D)[:, None]
    if META_BITS == 16:
        meta = (pages + KEY_META_OFF).to(tl.pointer_type(DTYPE))
        zero = tl.zeros(ok.shape, tl.float32)
        return tl.load(meta + d, mask=ok, other=0), tl.load(meta + D + d, mask=ok, other=0), zero, zero
    else:
        super_range = (pages + SUPER_OFF).to(tl.pointer_type(tl.float32))
        a = tl.load(pages + KEY_META_OFF + d, mask=ok, other=0)
        b = tl.load(pages + KEY_META_OFF + D + d, mask=ok, other=0)
        return a, b, tl.load(super_range, mask=ok, other=0.0), tl.load(super_range + 1, mask=ok, other=0.0)


@triton.jit
def _load_step(
    table,  # int32 [max_blocks]: this request's row of the block table
    j0,  # first block of the step
    j_hi,  # end of this split's blocks (blocks from here on load zeros)
    head_off_codes_k,  # byte offset of the KV head in a key-code page
    head_off_codes_v,
    head_off_meta,
    key_codes_ptr,  # uint8 pages holding the key codes (the lower layer's for a shared layer)
    key_codes_stride_block,
    value_codes_ptr,
    value_codes_stride_block,
    meta_ptr,  # uint8 pages of this layer (metadata)
    meta_stride_block,
    token_row,  # [N] page row of each tile column (pair order within a page)
    KEY_CODES_OFF: tl.constexpr,
    VALUE_CODES_OFF: tl.constexpr,
    KEY_META_OFF: tl.constexpr,
    VALUE_META_OFF: tl.constexpr,
    SUPER_OFF: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    NB: tl.constexpr,
    SL: tl.constexpr,
    NV: tl.constexpr,
    K_BITS: tl.constexpr,
    K_WORD_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Every load of one step, not yet unpacked (so that the loop issues them a step ahead): key code words
    [D, NB * words per row], key metadata [D, SL], value code words and metadata [NB * B, ...]."""
    K_ROW_BITS: tl.constexpr = B * K_BITS
    K_WORDS: tl.constexpr = K_ROW_BITS // K_WORD_BITS
    col = tl.arange(0, NB * K_WORDS)
    col_page = col // K_WORDS
    col_ok = j0 + col_page < j_hi
    col_block = tl.load(table + j0 + col_page, mask=col_ok, other=0).to(tl.int64)
    d = tl.arange(0, D)
    key_words = load_words(
        (key_codes_ptr + col_block * key_codes_stride_block + head_off_codes_k + KEY_CODES_OFF)[None, :]
        + d[:, None] * (K_ROW_BITS // 8),
        (col % K_WORDS)[None, :],
        col_ok[None, :],
        K_WORD_BITS,
    )
    slot = tl.arange(0, SL)
    slot_ok = (slot < NB) & (j0 + slot < j_hi)
    slot_block = tl.load(table + j0 + slot, mask=slot_ok, other=0).to(tl.int64)
    slot_pages = (meta_ptr + slot_block * meta_stride_block + head_off_meta)[None, :]
    ka, kb, klo, khi = _key_meta(slot_pages, slot_ok[None, :], KEY_META_OFF, SUPER_OFF, D, META_BITS, DTYPE)
    tok_page = tl.arange(0, NB * B) // B
    tok_ok = j0 + tok_page < j_hi
    tok_block = tl.load(table + j0 + tok_page, mask=tok_ok, other=0).to(tl.int64)
    vw, va, vb, vlo, vhi = load_value_rows(
        value_codes_ptr + tok_block * value_codes_stride_block + head_off_codes_v,
        meta_ptr + tok_block * meta_stride_block + head_off_meta,
        token_row,
        tok_ok,
        VALUE_CODES_OFF,
        VALUE_META_OFF,
        SUPER_OFF,
        D,
        B,
        NV,
        V_BITS,
        META_BITS,
        DTYPE,
    )
    return key_words, ka, kb, klo, khi, vw, va, vb, vlo, vhi


@triton.jit
def _decode_kernel(
    query_ptr,  # [T, HQ, D] model dtype
    query_stride_token,
    query_stride_head,
    key_ptr,  # [T, H, D] this step's keys (the own token)
    value_ptr,  # [T, H, D]
    kv_stride_token,
    kv_stride_head,
    out_ptr,  # [T, HQ, D]
    out_stride_token,
    out_stride_head,
    partial_ptr,  # fp32 [R, HQ, S, D] unnormalized split outputs (SPLIT only)
    partial_ml_ptr,  # fp32 [R, HQ, S, 2] each split's running max and sum (SPLIT only)
    key_codes_ptr,  # uint8 [num_blocks, H, page_bytes] pages holding the key codes
    key_codes_stride_block,
    key_codes_stride_head,
    value_codes_ptr,  # uint8 [num_blocks, H, page_bytes] pages holding the value codes
    value_codes_stride_block,
    value_codes_stride_head,
    meta_ptr,  # uint8 [num_blocks, H, page_bytes] this layer's pages (metadata)
    meta_stride_block,
    meta_stride_head,
    tail_k_ptr,  # [slots, H, B, D] model dtype
    tail_v_ptr,
    query_start_loc_ptr,  # int32 [R + 1]
    past_lens_ptr,  # int32 [R]
    block_table_ptr,  # int32 [R, max_blocks]
    block_table_stride,
    tail_slot_ptr,  # int32 [R]
    num_splits,  # S, the grid's third axis
    qk_scale,  # softmax scale * log2(e)
    key_eta,  # calibration (eta, 1 - 2 eta) of keys and values, fp32
    key_one_minus_2eta,
    value_eta,
    value_one_minus_2eta,
    SPLIT: tl.constexpr,  # S > 1: write partials for _combine_kernel
    MIN_BLOCKS: tl.constexpr,  # blocks a split takes at least
    H: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    GP: tl.constexpr,  # G padded to a power of two
    M: tl.constexpr,  # stacked rows: SL page slots x GP heads (>= 16 for the MMA)
    SL: tl.constexpr,
    D: tl.constexpr,
    B: tl.constexpr,
    NB: tl.constexpr,  # pages per loop step (<= SL)
    NV: tl.constexpr,  # value groups per token
    K_BITS: tl.constexpr,
    K_WORD_BITS: tl.constexpr,  # bits per loaded word of a key code row (key_word_bits)
    V_BITS: tl.constexpr,
    META_BITS: tl.constexpr,
    KEY_CODES_OFF: tl.constexpr,
    VALUE_CODES_OFF: tl.constexpr,
    KEY_META_OFF: tl.constexpr,
    VALUE_META_OFF: tl.constexpr,
    SUPER_OFF: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue each step's loads one step ahead
    KEY_CODE_BIAS: tl.constexpr,  # keep fp16's +1024 in the key codes, remove it in the per-row bias
    KEY_INT8: tl.constexpr,  # 0: fp16 key codes; 1: int8 codes x int8 query (rounded); 2: + the query's residual
    KEY_SUBNORMAL: tl.constexpr,  # fp16 key codes as subnormals c * 2^(o - 24) (one LOP3 per two codes)
    DOT_F32: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(query_start_loc_ptr + r)
    if tl.load(query_start_loc_ptr + r + 1) == q_row:  # no query row: batch padding or an idle request
        return
    DTYPE: tl.constexpr = tail_k_ptr.dtype.element_ty

    # This split's whole blocks: ceil(n_full / S), rounded up to whole steps and at least MIN_BLOCKS.
    past = tl.load(past_lens_ptr + r)
    n_full = past // B
    per_split = tl.maximum(tl.cdiv(tl.cdiv(n_full, num_splits), NB) * NB, MIN_BLOCKS)
    j_lo = split * per_split
    j_hi = tl.minimum(n_full, j_lo + per_split)
    g = tl.arange(0, GP)
    head_ok = g < G
    if SPLIT:
        at = ((r * H + h) * G + g) * num_splits + split
        if (split > 0) & (j_lo >= n_full):  # nothing to read: an empty partial
            tl.store(partial_ml_ptr + at * 2, tl.full([GP], float("-inf"), tl.float32), mask=head_ok)
            tl.store(partial_ml_ptr + at * 2 + 1, tl.zeros([GP], tl.float32), mask=head_ok)
            return

    # Stacked rows: row i = (page slot i // GP, query head i % GP). Everything runs transposed (keys or channels
    # x rows): the MMAs are codes[N, D] @ Q_scaled[D, M] and values[D, N] @ p[N, M], so that the large operand
    # takes the MMA's M side (warpgroup MMAs on Hopper) and the small stacked query its N side.
    i = tl.arange(0, M)
    row_slot = i // GP
    row_ok = (i % GP) < G
    d = tl.arange(0, D)
    q_heads = (h * G + g).to(tl.int64)
    q_t = tl.load(
        query_ptr + q_row.to(tl.int64) * query_stride_token + q_heads[None, :] * query_stride_head + d[:, None],
        mask=head_ok[None, :],
        other=0.0,
    )  # [D, GP]
    q_scaled = q_t.to(tl.float32) * qk_scale

    # Unpacked codes come in pair order (dequant.pair_order): key tokens are permuted within a page, so value
    # rows are loaded in that order; value channels within a word, so acc's rows use that order.
    K_PER_WORD: tl.constexpr = K_WORD_BITS // K_BITS
    channels = pair_order(d, 32 // V_BITS)
    N: tl.constexpr = NB * B
    n = tl.arange(0, N)
    tok_page = n // B
    if KEY_INT8:
        token_row = quad_order(n % B, K_BITS)
    else:
        token_row = pair_order(n % B, K_PER_WORD)
    own_page = (tok_page[:, None] == row_slot[None, :]) & row_ok[None, :]  # [N, M]: a row scores its slot's page
    if KEY_SUBNORMAL:  # 2^(24 - o) per key column, exact (built from the exponent bits)
        col_scale = ((151 - subnormal_shift(n % K_PER_WORD, K_BITS, K_PER_WORD)) << 23).to(tl.float32, bitcast=True)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc_t = tl.zeros([D, M], tl.float32)

    table = block_table_ptr + r * block_table_stride
    off_k = h * key_codes_stride_head
    off_v = h * value_codes_stride_head
    off_m = h * meta_stride_head
    if PREFETCH:
        kw, ka, kb, klo, khi, vw, va, vb, vlo, vhi = _load_step(
            table, j_lo, j_hi, off_k, off_v, off_m, key_codes_ptr, key_codes_stride_block, value_codes_ptr,
            value_codes_stride_block, meta_ptr, meta_stride_block, token_row, KEY_CODES_OFF, VALUE_CODES_OFF,
            KEY_META_OFF, VALUE_META_OFF, SUPER_OFF, D, B, NB, SL, NV, K_BITS, K_WORD_BITS, V_BITS, META_BITS, DTYPE,
        )  # fmt: skip
    for j0 in range(j_lo, j_hi, NB):
        if PREFETCH:  # the next step's loads in flight during this step's math (Triton's pipeliner misses them)
            nxt = _load_step(
                table, j0 + NB, j_hi, off_k, off_v, off_m, key_codes_ptr, key_codes_stride_block, value_codes_ptr,
                value_codes_stride_block, meta_ptr, meta_stride_block, token_row, KEY_CODES_OFF, VALUE_CODES_OFF,
                KEY_META_OFF, VALUE_META_OFF, SUPER_OFF, D, B, NB, SL, NV, K_BITS, K_WORD_BITS, V_BITS, META_BITS,
                DTYPE,
            )  # fmt: skip
        else:  # fewer registers: more programs per SM hide the loads instead
            kw, ka, kb, klo, khi, vw, va, vb, vlo, vhi = _load_step(
                table, j0, j_hi, off_k, off_v, off_m, key_codes_ptr, key_codes_stride_block, value_codes_ptr,
                value_codes_stride_block, meta_ptr, meta_stride_block, token_row, KEY_CODES_OFF, VALUE_CODES_OFF,
                KEY_META_OFF, VALUE_META_OFF, SUPER_OFF, D, B, NB, SL, NV, K_BITS, K_WORD_BITS, V_BITS, META_BITS,
                DTYPE,
            )  # fmt: skip
        k_scale, k_zero = group_params(ka, kb, klo, khi, K_BITS, key_eta, key_one_minus_2eta, META_BITS)  # [D, SL]
        bias = tl.sum(tl.reshape(k_zero[:, :, None] * q_scaled[:, None, :], (D, M)), 0)  # [M]
        ok = own_page & ((j0 + tok_page) < j_hi)[:, None]
        if KEY_INT8:  # int8 codes [N, D] @ int8 query [D, M] -> int32, the query rounded per row to 127 steps
            q_fold32 = tl.reshape(k_scale[:, :, None] * q_scaled[:, None, :], (D, M))
            amax = tl.max(tl.abs(q_fold32), 0)  # [M]
            q_step = tl.where(amax > 0, amax * (1.0 / 127.0), 1.0)
            x = q_fold32 / q_step[None, :]
            q_hi = tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int32)  # round half away from zero, |q_hi| <= 127
            codes8 = tl.trans(unpack_words_int8(kw, K_BITS))  # [N, D] int8, tokens in quad order
            dot = tl.dot(codes8, q_hi.to(tl.int8), out_dtype=tl.int32).to(tl.float32)
            if KEY_INT8 == 2:  # the rounding residual as a second int8 operand: 1/254 of a step
                res = (x - q_hi.to(tl.float32)) * 254.0
                q_lo = tl.where(res >= 0, res + 0.5, res - 0.5).to(tl.int32)
                dot += tl.dot(codes8, q_lo.to(tl.int8), out_dtype=tl.int32).to(tl.float32) * (1.0 / 254.0)
            s = tl.where(ok, dot * q_step[None, :], float("-inf"))
        else:
            q_fold = tl.reshape(k_scale[:, :, None] * q_scaled[:, None, :], (D, M)).to(tl.float16)
            if KEY_CODE_BIAS:  # codes are 1024 + c: one packed subtraction fewer per two key codes
                bias -= 1024.0 * tl.sum(q_fold.to(tl.float32), 0)
            if KEY_SUBNORMAL:
                codes = tl.trans(unpack_words_subnormal(kw, K_BITS, K_PER_WORD))  # [N, D] fp16 c * 2^(o - 24)
                s = tl.where(ok, tl.dot(codes, q_fold) * col_scale[:, None], float("-inf"))
            else:
                codes = tl.trans(unpack_words(kw, K_BITS, K_PER_WORD, KEY_CODE_BIAS))  # [N, D] fp16
                s = tl.where(ok, tl.dot(codes, q_fold), float("-inf"))
        p, alpha, m_i, l_i = _online_update(s, bias, m_i, l_i)
        v_t = tl.trans(value_tile(vw, va, vb, vlo, vhi, V_BITS, value_eta, value_one_minus_2eta, META_BITS))
        acc_t = acc_t * alpha[None, :] + tl.dot(v_t, p.to(tl.float16))
        if PREFETCH:
            kw, ka, kb, klo, khi, vw, va, vb, vlo, vhi = nxt

    if split == 0:  # the partial block (tail slot) and the step's own token, at full precision, slot 0's rows
        t = tl.arange(0, B)
        first_slot = ((row_slot == 0) & row_ok)[None, :]
        n_part = past - n_full * B
        q_stacked = tl.reshape(tl.broadcast_to(q_t[:, None, :], (D, SL, GP)), (D, M))
        tail_at = (tl.load(tail_slot_ptr + r).to(tl.int64) * H + h) * B * D + t * D
        ok = first_slot & (t < n_part)[:, None]
        acc_t, m_i, l_i = _attend_full_precision(
            q_stacked, acc_t, m_i, l_i, tail_k_ptr + tail_at, tail_v_ptr + tail_at, channels, ok, qk_scale, DOT_F32
        )
        own = q_row.to(tl.int64) * kv_stride_token + h * kv_stride_head + t * 0
        ok = first_slot & (t == 0)[:, None]
        acc_t, m_i, l_i = _attend_full_precision(
            q_stacked, acc_t, m_i, l_i, key_ptr + own, value_ptr + own, channels, ok, qk_scale, DOT_F32
        )

    # Merge the page slots of each query head (log-sum-exp), then store the split's partial or the output.
    m3 = tl.reshape(m_i, (SL, GP))
    m_head = tl.max(m3, 0)
    w = tl.where(m3 > float("-inf"), tl.math.exp2(m3 - tl.where(m_head > float("-inf"), m_head, 0.0)[None, :]), 0.0)
    l_head = tl.sum(tl.reshape(l_i, (SL, GP)) * w, 0)
    acc_head = tl.sum(tl.reshape(acc_t, (D, SL, GP)) * w[None, :, :], 1)  # [D, GP]
    if SPLIT:
        tl.store(partial_ptr + at[None, :] * D + channels[:, None], acc_head, mask=head_ok[None, :])
        tl.store(partial_ml_ptr + at * 2, m_head, mask=head_ok)
        tl.store(partial_ml_ptr + at * 2 + 1, l_head, mask=head_ok)
    else:
        o = acc_head / tl.where(l_head > 0, l_head, 1.0)[None, :]
        o_ptr = out_ptr + q_row.to(tl.int64) * out_stride_token + q_heads[None, :] * out_stride_head + channels[:, None]
        tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=head_ok[None, :])


@triton.jit
def _combine_kernel(
    partial_ptr,  # fp32 [R, HQ, S, D]
    partial_ml_ptr,  # fp32 [R, HQ, S, 2]
    out_ptr,  # [T, HQ, D]
    out_stride_token,
    out_stride_head,
    query_start_loc_ptr,  # int32 [R + 1]
    HQ: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SP: tl.constexpr,  # NUM_SPLITS padded to a power of two
    D: tl.constexpr,
):
    """Merge the splits of one (request, query head): weight each by ``2^(m_s - max m)``; empty splits weigh 0."""
    r = tl.program_id(0)
    hq = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + r)
    if tl.load(query_start_loc_ptr + r + 1) == q_row:
        return
    s = tl.arange(0, SP)
    at = (r.to(tl.int64) * HQ + hq) * NUM_SPLITS + s
    m = tl.load(partial_ml_ptr + at * 2, mask=s < NUM_SPLITS, other=float("-inf"))
    has = m > float("-inf")
    lsum = tl.load(partial_ml_ptr + at * 2 + 1, mask=has, other=0.0)
    w = tl.where(has, tl.math.exp2(m - tl.max(m, 0)), 0.0)  # split 0 always has the own token: max m finite
    d = tl.arange(0, D)
    acc = tl.load(partial_ptr + at[:, None] * D + d[None, :], mask=has[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + q_row.to(tl.int64) * out_stride_token + hq * out_stride_head + d, o.to(out_ptr.dtype.element_ty))


def key_word_bits(block: int, k_bits: int) -> int:
    """Bits per loaded word of a key code row: 32 (or the row), but 16 for 1-bit keys: a 32-code word unpacks
    into one thread's whole row of the tile, which then reaches shared memory 2 bytes at a time (sm_90 SASS of
    a 1-bit layer: 1553 instructions a step with 32-bit words, 1308 with 16-bit ones). 1-bit values keep 32-bit
    words: 16-bit ones made their stores worse (1613)."""
    return 16 if k_bits == 1 else min(32, block * k_bits)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_splits(num_reqs: int, num_kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Splits per (request, KV head), from shapes only: ``PROGRAMS_PER_SM`` programs per SM, no more splits
    than ``max_blocks / MIN_BLOCKS_PER_SPLIT`` (``max_blocks``: the block table's width)."""
    want = -(-PROGRAMS_PER_SM * _sm_count(device) // max(1, num_reqs * num_kv_heads))
    return max(1, min(want, max_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))


def launch_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan,
    layout,
    offsets: tuple[int, int],
    etas: tuple[tuple[float, float], tuple[float, float]],
    scale: float,
    *,
    num_splits: int | None = None,
    tile_tokens: int | None = None,
    num_warps: int | None = None,
    max_registers: int | None = None,
    prefetch: bool = True,
    key_code_bias: bool = False,
    key_int8: int | None = None,
    key_subnormal: bool | None = None,
) -> None:
    """Launch the decode kernel (and the split merge). ``offsets``: the key and value code offsets in
    ``key_codes`` / ``value_codes`` pages; ``etas``: ``(eta, 1 - 2 eta)`` of keys and values. Shapes decide
    the grid, so the launch can be captured (module docstring). ``key_code_bias``: leave the magic-number
    conversion's +1024 in the key codes and subtract ``1024 * sum_d q_d`` from each row's score (fewer
    instructions; the MMA's fp32 sums then carry a term ~1024x the score, so the score loses ~10 bits).
    ``key_subnormal`` (default :data:`KEY_SUBNORMAL`): unpack key codes as fp16 subnormals (exact; one LOP3 per
    two codes) and scale the scores back per key column. ``key_int8`` (default :data:`KEY_INT8`): int8 key
    codes times the page-scaled query rounded to int8 per stacked row (1: an approximation, 4e-3 to 7e-3
    relative error in run 6's GPU checks; 2: plus the rounding residual as a second int8 MMA, as exact as the
    fp16 path); both slower than the fp16 paths (kernels_gpu_notes.md, run 6); rows
    of fewer than 32 bits fall back to the fp16 path. ``key_code_bias`` and ``key_int8`` override
    ``key_subnormal``."""
    T, HQ, D = query.shape
    H = key.shape[1]
    key_int8 = KEY_INT8 if key_int8 is None else key_int8
    if key_int8 and layout.block * layout.k_bits < 32:  # a key row shorter than a word: the fp16 path
        key_int8 = 0
    G = HQ // H
    GP = triton.next_power_of_2(G)
    R = plan.past_lens.shape[0]
    B = layout.block
    tokens = min(tile_tokens or TILE_TOKENS, MAX_TILE_ELEMENTS // D)
    NB = max(1, tokens // B)
    M = max(16, NB * GP)
    S = num_splits or decode_splits(R, H, plan.block_table.shape[1], query.device)
    if R == 0 or T == 0:
        return
    if S > 1:
        partial = torch.empty(R, HQ, S, D, dtype=torch.float32, device=query.device)
        partial_ml = torch.empty(R, HQ, S, 2, dtype=torch.float32, device=query.device)
    else:
        partial = partial_ml = out  # unused
    (key_eta, key_ome), (value_eta, value_ome) = etas
    _decode_kernel[(R, H, S)](
        query,
        query.stride(0),
        query.stride(1),
        key,
        value,
        key.stride(0),
        key.stride(1),
        out,
        out.stride(0),
        out.stride(1),
        partial,
        partial_ml,
        key_codes,
        key_codes.stride(0),
        key_codes.stride(1),
        value_codes,
        value_codes.stride(0),
        value_codes.stride(1),
        pages,
        pages.stride(0),
        pages.stride(1),
        tail_k,
        tail_v,
        plan.query_start_loc,
        plan.past_lens,
        plan.block_table,
        plan.block_table.stride(0),
        plan.tail_slot,
        S,
        scale * LOG2E,
        key_eta,
        key_ome,
        value_eta,
        value_ome,
        SPLIT=S > 1,
        MIN_BLOCKS=MIN_BLOCKS_PER_SPLIT,
        H=H,
        G=G,
        GP=GP,
        M=M,
        SL=M // GP,
        D=D,
        B=B,
        NB=NB,
        NV=layout.v_groups,
        K_BITS=layout.k_bits,
        K_WORD_BITS=32 if key_int8 else key_word_bits(B, layout.k_bits),
        V_BITS=layout.v_bits,
        META_BITS=layout.meta_bits,
        KEY_CODES_OFF=offsets[0],
        VALUE_CODES_OFF=offsets[1],
        KEY_META_OFF=layout.k_meta_off,
        VALUE_META_OFF=layout.v_meta_off,
        SUPER_OFF=max(layout.super_off, 0),
        PREFETCH=prefetch,
        KEY_CODE_BIAS=key_code_bias and not key_int8,
        KEY_INT8=key_int8,
        KEY_SUBNORMAL=bool(KEY_SUBNORMAL if key_subnormal is None else key_subnormal)
        and not (key_int8 or key_code_bias),
        DOT_F32=query.device.type != "cuda",
        num_warps=num_warps or 4,
        **({"maxnreg": max_registers} if max_registers else {}),
    )
    if S > 1:
        _combine_kernel[(R, HQ)](
            partial,
            partial_ml,
            out,
            out.stride(0),
            out.stride(1),
            plan.query_start_loc,
            HQ=HQ,
            NUM_SPLITS=S,
            SP=triton.next_power_of_2(S),
            D=D,
        )

"""Paged attention that dequantizes pages inside the kernel: the generic kernel (prefill, chunked prefill, and the
bf16 baseline) and ``paged_attention_triton``, which sends decode steps to ``decode.py``.

One program handles one request, one KV head, a tile of ``QT`` query tokens and one split of the context.
Its ``M`` rows are (token, query head) pairs: all ``G`` query heads of the KV head share every loaded page
(GQA). It walks the request's whole blocks in its split, ``NB`` pages (``N = NB * B`` tokens) per step, then
(last split only) the partial block and the step's own tokens, causally, with an fp32 online softmax in base
2. With more than one split, each writes an unnormalized partial and ``_combine_kernel`` merges them
(flash-decoding).

Per step the codes of ``NB`` pages are unpacked and dequantized in registers, in fp16 (``dequant.key_tile``,
``dequant.value_tile``), and feed two fp16 MMAs with fp32 accumulation: scores ``q @ K^T`` and ``p @ V``. The
loads of step ``i + 1`` (codes, metadata) are issued before the math of step ``i`` (a software pipeline by
hand: Triton's pipeliner does not reach loads whose addresses come from the block table). The unpacked codes
are in pair order (``dequant.pair_order``): keys permute the tokens of a page, so the value rows are loaded in
that order; values permute the channels, so ``acc`` and every full-precision value row use that order too. Keys
are dequantized here, not folded into the query: with several query tokens per tile the rows are taken, and the
fold (one scaled query per page) is the decode kernel's. fp16 holds the codes exactly and keeps 3 more mantissa
bits than the bf16 the reference rounds its dequantized cache to.

``FP_PAGES`` turns the same kernel into the full-precision baseline (the benchmark's fair comparison: same loop,
at the copy bandwidth): pages are then ``[num_blocks, H, B, D]`` tensors of keys and values in the model dtype
(the tail's layout), read by the same loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xquant_vllm.config import LayerQuant
from xquant_vllm.layout import PageLayout

from .decode import launch_decode
from .dequant import calibration, key_tile, load_key_page, load_value_rows, pair_order, value_tile
from .plan import StepPlan

LOG2E = 1.4426950408889634
MIN_BLOCKS_PER_SPLIT = 8  # below this a split's fixed cost outweighs the parallelism it adds
TILE_TOKENS = 128  # tokens (pages) per loop step: the loads in flight per program
MAX_TILE_ELEMENTS = 128 * 128  # tokens x head size of one step (registers and shared memory)


@triton.jit
def _online_update(s, m_i, l_i):
    """Softmax bookkeeping for one tile of base-2 scores ``s`` [M, N] (masked entries -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no NaN from -inf - -inf
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_rows(q, acc, m_i, l_i, k_rows, v_rows, dv, col_ok, qk_scale, D: tl.constexpr, DOT_F32: tl.constexpr):
    """Attend to full-precision keys/values whose rows start at ``k_rows``/``v_rows`` [N] (tail, chunk, fp page).

    ``col_ok`` [M, N] masks keys out (invalid rows, or causally); ``dv`` [D] is the channel order of ``acc``.
    The dots run in the model dtype, or in fp32 with ``DOT_F32`` (Triton 3.9's interpreter computes bf16 dots
    wrongly).
    """
    d = tl.arange(0, D)
    rows_ok = tl.max(col_ok.to(tl.int32), 0) > 0
    k = tl.load(k_rows[None, :] + d[:, None], mask=rows_ok[None, :], other=0.0)
    if DOT_F32:
        q, k = q.to(tl.float32), k.to(tl.float32)
    s = tl.where(col_ok, tl.dot(q, k) * qk_scale, float("-inf"))
    p, alpha, m_i, l_i = _online_update(s, m_i, l_i)
    v = tl.load(v_rows[:, None] + dv[None, :], mask=rows_ok[:, None], other=0.0)
    if DOT_F32:
        v = v.to(tl.float32)
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v), m_i, l_i


@triton.jit
def _load_pages(
    table,  # int32 [max_blocks]: this request's row of the block table
    j0,  # first block of the step
    j_hi,  # end of the split's blocks
    h,  # KV head
    pos,  # [NB * B] page row of each tile column (pair order)
    key_codes_ptr,
    key_codes_stride_block,
    key_codes_stride_head,
    value_codes_ptr,
    value_codes_stride_block,
    value_codes_stride_head,
    meta_ptr,
    meta_stride_block,
    meta_stride_head,
    key_codes_off,
    value_codes_off,
    key_meta_off,
    value_meta_off,
    super_off,
    D: tl.constexpr,
    B: tl.constexpr,
    NB: tl.constexpr,
    NV: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Every load of the ``NB`` pages of the step at block ``j0`` (codes and metadata, keys then values, one flat
    tuple), not yet dequantized. Blocks from ``j_hi`` on are not read: they load zeros, which dequantize to
    zeros (their scores are masked, and ``p = 0`` times a zero value is 0, where times a NaN it would not be)."""
    WORDS: tl.constexpr = (B * K_BITS + 31) // 32  # words per key code row
    c = tl.arange(0, NB * WORDS) // WORDS
    b = tl.arange(0, NB)
    n = tl.arange(0, NB * B) // B
    c_ok, b_ok, n_ok = j0 + c < j_hi, j0 + b < j_hi, j0 + n < j_hi
    blk_c = tl.load(table + j0 + c, mask=c_ok, other=0).to(tl.int64)
    blk_b = tl.load(table + j0 + b, mask=b_ok, other=0).to(tl.int64)
    blk = tl.load(table + j0 + n, mask=n_ok, other=0).to(tl.int64)
    kw, ka, kb, klo, khi = load_key_page(
        key_codes_ptr + blk_c * key_codes_stride_block + h * key_codes_stride_head,
        meta_ptr + blk_b * meta_stride_block + h * meta_stride_head,
        c_ok,
        b_ok,
        key_codes_off,
        key_meta_off,
        super_off,
        D,
        B,
        NB,
        K_BITS,
        META_BITS,
        DTYPE,
    )
    vw, va, vb, vlo, vhi = load_value_rows(
        value_codes_ptr + blk * value_codes_stride_block + h * value_codes_stride_head,
        meta_ptr + blk * meta_stride_block + h * meta_stride_head,
        pos,
        n_ok,
        value_codes_off,
        value_meta_off,
        super_off,
        D,
        B,
        NV,
        V_BITS,
        META_BITS,
        DTYPE,
    )
    return kw, ka, kb, klo, khi, vw, va, vb, vlo, vhi


@triton.jit
def _attention_kernel(
    query_ptr,  # [T, HQ, D] model dtype
    query_stride_token,
    query_stride_head,
    key_ptr,  # [T, H, D] this step's keys (the chunk)
    value_ptr,  # [T, H, D]
    kv_stride_token,
    kv_stride_head,
    out_ptr,  # [T, HQ, D]
    out_stride_token,
    out_stride_head,
    partial_ptr,  # fp32 [T, HQ, S, D] unnormalized split outputs (SPLIT only)
    partial_ml_ptr,  # fp32 [T, HQ, S, 2] each split's running max and sum (SPLIT only)
    num_splits,  # S
    key_codes_ptr,  # uint8 [num_blocks, H, page_bytes] pages holding the key codes (or bf16 keys, FP_PAGES)
    key_codes_stride_block,
    key_codes_stride_head,
    value_codes_ptr,  # uint8 [num_blocks, H, page_bytes] pages holding the value codes (or bf16 values)
    value_codes_stride_block,
    value_codes_stride_head,
    meta_ptr,  # uint8 [num_blocks, H, page_bytes] this layer's pages (metadata)
    meta_stride_block,
    meta_stride_head,
    key_codes_off,  # byte offsets of the page sections (layout.py)
    value_codes_off,
    key_meta_off,
    value_meta_off,
    super_off,
    tail_k_ptr,  # [slots, H, B, D] model dtype
    tail_v_ptr,
    query_start_loc_ptr,  # int32 [R + 1]
    past_lens_ptr,  # int32 [R]
    block_table_ptr,  # int32 [R, max_blocks]
    block_table_stride,
    tail_slot_ptr,  # int32 [R]
    qk_scale,  # softmax scale * log2(e)
    key_eta,  # calibration (eta, 1 - 2 eta) of keys and values, fp32
    key_one_minus_2eta,
    value_eta,
    value_one_minus_2eta,
    n_qtiles,  # query tiles per request
    blocks_per_split,
    H: tl.constexpr,
    G: tl.constexpr,  # query heads per KV head
    GP: tl.constexpr,  # G padded to a power of two
    QT: tl.constexpr,  # query tokens per tile
    M: tl.constexpr,  # rows: QT x GP, at least 16
    D: tl.constexpr,
    B: tl.constexpr,
    NB: tl.constexpr,  # pages per loop step
    NV: tl.constexpr,  # value groups per token
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    META_BITS: tl.constexpr,
    FP_PAGES: tl.constexpr,  # the bf16 baseline: pages are [num_blocks, H, B, D] keys / values
    SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    r = tl.program_id(0) // n_qtiles
    q_start = tl.load(query_start_loc_ptr + r)
    row0 = q_start + (tl.program_id(0) % n_qtiles) * QT
    q_end = tl.load(query_start_loc_ptr + r + 1)
    if row0 >= q_end:
        return
    h = tl.program_id(1)
    split = tl.program_id(2)
    DTYPE: tl.constexpr = tail_k_ptr.dtype.element_ty

    i = tl.arange(0, M)
    row = row0 + i // GP
    head = h * G + i % GP
    row_ok = (i % GP < G) & (i // GP < QT) & (row < q_end)
    d = tl.arange(0, D)
    q_at = query_ptr + row[:, None] * query_stride_token + head[:, None] * query_stride_head + d[None, :]
    q = tl.load(q_at, mask=row_ok[:, None], other=0.0)
    q16 = (q.to(tl.float32) * qk_scale).to(tl.float16)
    # Quantized pages come out of dequant.unpack_words in pair order: the key tile's tokens and the value
    # tile's channels (hence acc's columns) are permuted within each code word; full-precision rows follow.
    K_PER_WORD: tl.constexpr = min(32, B * K_BITS) // K_BITS
    dv = d if FP_PAGES else pair_order(d, 32 // V_BITS)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)

    # Whole blocks of this split, NB pages (N tokens) per step: token n is row n % B of block j0 + n // B.
    past = tl.load(past_lens_ptr + r)
    n_full = past // B
    N: tl.constexpr = NB * B
    n = tl.arange(0, N)
    pos = n % B if FP_PAGES else pair_order(n % B, K_PER_WORD)  # the page row of tile column n
    table = block_table_ptr + r * block_table_stride
    j_lo = split * blocks_per_split
    j_hi = tl.minimum(n_full, j_lo + blocks_per_split)
    if not FP_PAGES:  # software pipeline: each step issues the next step's page loads before its own math
        kw, ka, kb, klo, khi, vw, va, vb, vlo, vhi = _load_pages(
            table, j_lo, j_hi, h, pos,
            key_codes_ptr, key_codes_stride_block, key_codes_stride_head,
            value_codes_ptr, value_codes_stride_block, value_codes_stride_head,
            meta_ptr, meta_stride_block, meta_stride_head,
            key_codes_off, value_codes_off, key_meta_off, value_meta_off, super_off,
            D, B, NB, NV, K_BITS, V_BITS, META_BITS, DTYPE,
        )  # fmt: skip
    for j0 in range(j_lo, j_hi, NB):
        tok_ok = j0 + n // B < j_hi
        ok = row_ok[:, None] & tok_ok[None, :]
        if FP_PAGES:
            blk = tl.load(table + j0 + n // B, mask=tok_ok, other=0).to(tl.int64)
            k_rows = key_codes_ptr + blk * key_codes_stride_block + h * key_codes_stride_head + pos * D
            v_rows = value_codes_ptr + blk * value_codes_stride_block + h * value_codes_stride_head + pos * D
            acc, m_i, l_i = _attend_rows(q, acc, m_i, l_i, k_rows, v_rows, dv, ok, qk_scale, D, DOT_F32)
        else:
            nxt = _load_pages(  # in flight during this step's math
                table, j0 + NB, j_hi, h, pos,
                key_codes_ptr, key_codes_stride_block, key_codes_stride_head,
                value_codes_ptr, value_codes_stride_block, value_codes_stride_head,
                meta_ptr, meta_stride_block, meta_stride_head,
                key_codes_off, value_codes_off, key_meta_off, value_meta_off, super_off,
                D, B, NB, NV, K_BITS, V_BITS, META_BITS, DTYPE,
            )  # fmt: skip
            k = key_tile(kw, ka, kb, klo, khi, B, K_BITS, key_eta, key_one_minus_2eta, META_BITS)
            s = tl.where(ok, tl.dot(q16, k), float("-inf"))
            p, alpha, m_i, l_i = _online_update(s, m_i, l_i)
            v = value_tile(vw, va, vb, vlo, vhi, V_BITS, value_eta, value_one_minus_2eta, META_BITS)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
            kw, ka, kb, klo, khi, vw, va, vb, vlo, vhi = nxt

    # The last split also reads the partial block and the step's own tokens (causal), B rows at a time.
    last = split == num_splits - 1
    n_part = tl.where(last, past - n_full * B, 0)
    t = tl.arange(0, B)
    if FP_PAGES:
        part_blk = tl.load(table + n_full, mask=n_part > 0, other=0).to(tl.int64)
        pk = key_codes_ptr + part_blk * key_codes_stride_block + h * key_codes_stride_head
        pv = value_codes_ptr + part_blk * value_codes_stride_block + h * value_codes_stride_head
    else:
        slot = tl.load(tail_slot_ptr + r).to(tl.int64)
        pk = tail_k_ptr + (slot * H + h) * B * D
        pv = tail_v_ptr + (slot * H + h) * B * D
    for _ in range(0, n_part, B):
        ok = row_ok[:, None] & (t[None, :] < n_part)
        acc, m_i, l_i = _attend_rows(q, acc, m_i, l_i, pk + t * D, pv + t * D, dv, ok, qk_scale, D, DOT_F32)

    my_chunk_pos = row - q_start  # query row's index within the chunk = the keys it may see
    c_hi = tl.where(last, tl.minimum(q_end, row0 + QT) - q_start, 0)
    for c0 in range(0, c_hi, B):
        ok = row_ok[:, None] & (c0 + t[None, :] <= my_chunk_pos[:, None])
        rows = (q_start + c0 + t).to(tl.int64) * kv_stride_token + h * kv_stride_head
        acc, m_i, l_i = _attend_rows(q, acc, m_i, l_i, key_ptr + rows, value_ptr + rows, dv, ok, qk_scale, D, DOT_F32)

    if SPLIT:
        at = (row.to(tl.int64) * (H * G) + head) * num_splits + split
        tl.store(partial_ptr + at[:, None] * D + dv[None, :], acc, mask=row_ok[:, None])
        tl.store(partial_ml_ptr + at * 2, m_i, mask=row_ok)
        tl.store(partial_ml_ptr + at * 2 + 1, l_i, mask=row_ok)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0 only on padding rows, never stored
        o_ptr = out_ptr + row[:, None] * out_stride_token + head[:, None] * out_stride_head + dv[None, :]
        tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    partial_ptr,  # fp32 [T, HQ, S, D]
    partial_ml_ptr,  # fp32 [T, HQ, S, 2]
    out_ptr,  # [T, HQ, D]
    out_stride_token,
    out_stride_head,
    num_splits,
    HQ: tl.constexpr,
    SP: tl.constexpr,  # num_splits padded to a power of two
    D: tl.constexpr,
):
    """Merge the splits' partials of one (row, query head): rescale each by ``2^(m_s - max m)``."""
    row = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    s = tl.arange(0, SP)
    ok = s < num_splits
    at = (row * HQ + hq) * num_splits + s
    m = tl.load(partial_ml_ptr + at * 2, mask=ok, other=float("-inf"))
    lsum = tl.load(partial_ml_ptr + at * 2 + 1, mask=ok, other=0.0)
    w = tl.math.exp2(m - tl.max(m, 0))
    w = tl.where(ok & (m > float("-inf")), w, 0.0)
    d = tl.arange(0, D)
    acc = tl.load(partial_ptr + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + row * out_stride_token + hq * out_stride_head + d, o.to(out_ptr.dtype.element_ty))


def _pick_splits(plan: StepPlan, work: int, device: torch.device) -> int:
    """Split the context only when the batch alone leaves the GPU idle (decode on long contexts)."""
    blocks = plan.max_past_len // plan.block_size
    if plan.max_query_len > 1 or blocks < 2 * MIN_BLOCKS_PER_SPLIT:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(blocks // MIN_BLOCKS_PER_SPLIT, -(-4 * sms // work)))


def _check_common(query: torch.Tensor, key: torch.Tensor, out: torch.Tensor, block: int, plan: StepPlan) -> None:
    D = query.shape[-1]
    if D not in (64, 128, 256):
        raise ValueError(f"head_size={D}: the kernels support 64, 128 and 256")
    if block < 16 or block & (block - 1):
        raise ValueError(f"k_group={block}: the kernels need a power of two >= 16 (block = key group)")
    if plan.block_size != block:
        raise ValueError(f"plan.block_size={plan.block_size} differs from the layout's block {block}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads {query.shape[1]} is not a multiple of KV heads {key.shape[1]}")
    for name, x in (("query", query), ("key", key), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: channels must be contiguous (stride {x.stride(-1)})")


def _launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    plan: StepPlan,
    scale: float,
    block: int,
    fp_pages: bool,
    kc: torch.Tensor,  # pages holding the key codes (the bf16 key cache with fp_pages)
    vc: torch.Tensor,  # pages holding the value codes (the bf16 value cache)
    meta: torch.Tensor,  # this layer's pages
    offsets: tuple[int, int, int, int, int],  # key codes, value codes, key meta, value meta, super range
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    bits: tuple[int, int, int, int],  # key bits, value bits, metadata bits, value groups
    etas: tuple[tuple[float, float], tuple[float, float]],
    num_splits: int | None,
    tile_tokens: int | None,
    num_warps: int | None,
) -> None:
    """The generic kernel (any query length; the bf16 baseline with ``fp_pages``) and its split merge."""
    T, HQ, D = query.shape
    H = key.shape[1]
    G = HQ // H
    GP = triton.next_power_of_2(G)
    R = plan.num_reqs
    QT = 1 if plan.max_query_len <= 1 else max(1, min(64 // GP, triton.next_power_of_2(plan.max_query_len)))
    M = max(16, QT * GP)
    n_qtiles = max(1, -(-plan.max_query_len // QT))
    tokens = min(tile_tokens or TILE_TOKENS, MAX_TILE_ELEMENTS // D)  # the dequantized tile lives in registers
    NB = max(1, tokens // block)
    blocks = plan.max_past_len // block
    S = num_splits or _pick_splits(plan, R * H * n_qtiles, query.device)
    blocks_per_split = -(-max(1, -(-blocks // S)) // NB) * NB  # whole tiles per split
    S = max(1, -(-blocks // blocks_per_split))
    if R == 0 or T == 0:
        return
    if S > 1:
        part = torch.empty(T, HQ, S, D, dtype=torch.float32, device=query.device)
        ml = torch.empty(T, HQ, S, 2, dtype=torch.float32, device=query.device)
    else:
        part = ml = out  # unused
    (key_eta, key_one_minus_2eta), (value_eta, value_one_minus_2eta) = etas
    _attention_kernel[(R * n_qtiles, H, S)](
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
        part,
        ml,
        S,
        kc,
        kc.stride(0),
        kc.stride(1),
        vc,
        vc.stride(0),
        vc.stride(1),
        meta,
        meta.stride(0),
        meta.stride(1),
        *offsets,
        tail_k,
        tail_v,
        plan.query_start_loc,
        plan.past_lens,
        plan.block_table,
        plan.block_table.stride(0),
        plan.tail_slot,
        scale * LOG2E,
        key_eta,
        key_one_minus_2eta,
        value_eta,
        value_one_minus_2eta,
        n_qtiles,
        blocks_per_split,
        H=H,
        G=G,
        GP=GP,
        QT=QT,
        M=M,
        D=D,
        B=block,
        NB=NB,
        NV=bits[3],
        K_BITS=bits[0],
        V_BITS=bits[1],
        META_BITS=bits[2],
        FP_PAGES=fp_pages,
        SPLIT=S > 1,
        DOT_F32=query.device.type != "cuda",
        num_warps=num_warps or (4 if M <= 16 and D <= 128 and bits[2] == 16 else 8),  # fewer spill at 8 (sm_90 SASS)
    )
    if S > 1:
        _combine_kernel[(T, HQ)](part, ml, out, out.stride(0), out.stride(1), S, HQ, triton.next_power_of_2(S), D)


def paged_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan: StepPlan,
    lq: LayerQuant,
    layout: PageLayout,
    scale: float,
    out: torch.Tensor,
    lower_pages: torch.Tensor | None = None,
    lower_layout: PageLayout | None = None,
    *,
    num_splits: int | None = None,
    tile_tokens: int | None = None,
    num_warps: int | None = None,
    generic: bool = False,
    max_registers: int | None = None,
    prefetch: bool = True,
    key_code_bias: bool = False,
) -> None:
    """Attention of this step's rows over the quantized pages, the tail and the chunk; writes all of ``out``.

    Semantics: xquant_vllm/quant/attention.py (paged rule, past-only). A shared layer reads the codes of the
    shared tensor from ``lower_pages`` at ``lower_layout``'s offsets. A decode step (``plan.max_query_len <= 1``)
    runs the decode kernel (``decode.py``: key scales folded into the query, a launch CUDA graphs can capture),
    any other step this module's kernel; ``generic=True`` forces the latter (tests, benchmark comparisons).
    ``num_splits``, ``tile_tokens``, ``num_warps`` and (decode) ``max_registers``, ``prefetch``,
    ``key_code_bias`` override the context split, the tokens per loop step, the warps per program, the register
    cap, the loads issued a step ahead and where the key codes' fp16 bias is removed (benchmark sweeps).
    """
    _check_common(query, key, out, layout.block, plan)
    if (lq.k_shared or lq.v_shared) and (lower_pages is None or lower_layout is None):
        raise ValueError(f"layer {lq.index} shares codes: pass lower_pages and lower_layout")
    if pages.stride(-1) != 1 or not (tail_k.is_contiguous() and tail_v.is_contiguous()):
        raise ValueError("pages (last axis), tail_k and tail_v must be contiguous")
    kc, key_codes_off = (lower_pages, lower_layout.k_codes_off) if lq.k_shared else (pages, layout.k_codes_off)
    vc, value_codes_off = (lower_pages, lower_layout.v_codes_off) if lq.v_shared else (pages, layout.v_codes_off)
    etas = (calibration(lq.k_eta), calibration(lq.v_eta))
    if plan.max_query_len <= 1 and not generic:
        launch_decode(
            query, key, value, out, kc, vc, pages, tail_k, tail_v, plan, layout,
            (key_codes_off, value_codes_off), etas, scale,
            num_splits=num_splits, tile_tokens=tile_tokens, num_warps=num_warps, max_registers=max_registers,
            prefetch=prefetch, key_code_bias=key_code_bias,
        )  # fmt: skip
        return
    offsets = (key_codes_off, value_codes_off, layout.k_meta_off, layout.v_meta_off, layout.super_off)
    bits = (lq.k_bits, lq.v_bits, lq.meta_bits, layout.v_groups)
    _launch(
        query, key, value, out, plan, scale, layout.block, False, kc, vc, pages, offsets, tail_k, tail_v, bits, etas,
        num_splits, tile_tokens, num_warps,
    )  # fmt: skip


def paged_attention_fp_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: StepPlan,
    scale: float,
    out: torch.Tensor,
    *,
    num_splits: int | None = None,
    tile_tokens: int | None = None,
    num_warps: int | None = None,
) -> None:
    """The same kernel over a full-precision paged cache ``[num_blocks, H, B, D]`` (the benchmark's baseline).

    Every past token, the partial last block included, lives in the pages (no tail buffer).
    """
    block = k_cache.shape[2]
    _check_common(query, key, out, block, plan)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [num_blocks, H, B, D]")
    offsets = (0, 0, 0, 0, 0)
    bits = (1, 1, 16, 1)
    etas = (calibration(0.0), calibration(0.0))
    _launch(
        query, key, value, out, plan, scale, block, True, k_cache, v_cache, k_cache, offsets, k_cache, v_cache,
        bits, etas, num_splits, tile_tokens, num_warps,
    )  # fmt: skip


__all__ = ["paged_attention_triton", "paged_attention_fp_triton"]

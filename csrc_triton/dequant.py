"""Triton helpers that read one page (xquant_vllm/layout.py) and dequantize it: shared by every kernel.

Three layers, smallest first:

* :func:`load_words` and :func:`unpack_words` turn packed code rows into an fp16 tile. Rows are read as
  32-bit (or 16-bit) little-endian words, so element ``j`` of a row sits in word ``j // (32 / b)`` at bits
  ``b * (j % (32 / b))``: the LSB-first order of :mod:`xquant_vllm.quant.packing`, one load per word. The
  codes come out two per register, in *pair order* (:func:`pair_order`), which callers follow.
* :func:`decode_minmax` and :func:`calibrate` repeat the fp32 operations of xquant_vllm/quant/groups.py in
  order (8-bit min/max against the super range, then ``s_cal``, ``z_cal``): the store uses them, bit-exact.
  :func:`load_meta` loads a page's metadata in either form and :func:`group_params` turns it into fp32
  ``(s_cal, z_cal)`` for attention (to an ulp, not bit for bit).
* :func:`load_key_page` / :func:`key_tile` and :func:`load_value_rows` / :func:`value_tile` load, then
  dequantize, the key and value sections of several pages at once (a tile of tokens that spans pages, each
  column or row with its own page pointer), ``c * s + z`` in fp16: packed two to an instruction, and exact
  for the codes; it assumes ``|x| < 65504`` (fp16's range). Loading and dequantizing are separate so that a
  loop can issue the next step's loads before this step's math.

Bit-exactness with the reference needs the kernel compiled with ``enable_fp_fusion=False`` (no ``a * b + c``
turned into one FMA); attention does not need it and keeps fusion on.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter (CI) runs no PTX: unpack_words then takes its plain-Triton twin.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def calibration(eta: float) -> tuple[float, float]:
    """``(eta, 1 - 2 eta)``, each rounded once to fp32 as the reference's ``torch.tensor(x, dtype=float32)``: the
    calibration arguments of every kernel (the store needs them bit-exact, attention passes the same)."""
    return float(torch.tensor(eta, dtype=torch.float32)), float(torch.tensor(1.0 - 2.0 * eta, dtype=torch.float32))


@triton.jit
def unpack_words(words, BITS: tl.constexpr, PER_WORD: tl.constexpr, KEEP_BIAS: tl.constexpr = False):
    """fp16 codes ``[R, W * PER_WORD]`` of packed words ``[R, W]`` (uint32; ``PER_WORD`` codes each, LSB first),
    in *pair order*: position ``p`` of a word holds code :func:`pair_order` ``(p)``.

    Two codes per instruction, in the two fp16 lanes of one 32-bit register: code ``k`` sits at bit ``BITS * k``
    and code ``k + PER_WORD / 2`` at bit ``16 + BITS * k``, so one shift and one mask-and-OR with ``0x64006400``
    (fp16 1024.0 in both lanes) give the pair ``(1024 + c_k, 1024 + c_{k + PER_WORD/2})`` exactly; one packed
    subtraction leaves the codes. The shifts fan out with ``tl.join`` so each thread keeps its whole word (no
    shared-memory shuffle). Callers follow the pair order instead of restoring the natural one (free for keys:
    the value rows are loaded in the same token order; for values the output channels are stored permuted).
    ``KEEP_BIAS``: skip the subtraction and return ``1024 + c`` (exact in fp16), for a caller that removes the
    bias after a linear map (the decode kernel's key scores: ``-1024 * sum_d q_d`` per row).
    """
    HALF: tl.constexpr = PER_WORD // 2
    x = words
    if PER_WORD * BITS == 16:  # a 16-bit row (1-bit keys, 16-token block): move its upper byte to bit 16
        x = (x & 0xFF) | ((x & 0xFF00) << 8)
    if HALF >= 16:
        x = tl.join(x, x >> (8 * BITS))
    if HALF >= 8:
        x = tl.join(x, x >> (4 * BITS))
    if HALF >= 4:
        x = tl.join(x, x >> (2 * BITS))
    if HALF >= 2:
        x = tl.join(x, x >> BITS)
    y = (x & (((1 << BITS) - 1) * 0x10001)) | 0x64006400
    BIAS: tl.constexpr = 0.0 if KEEP_BIAS else 1024.0
    if INTERPRET:
        lo = y.to(tl.uint16).to(tl.float16, bitcast=True) - BIAS
        hi = (y >> 16).to(tl.uint16).to(tl.float16, bitcast=True) - BIAS
        codes = tl.join(lo, hi)
    else:  # one packed subtraction on the register that holds both lanes (the halves re-pack into y itself)
        halves = tl.join(y.to(tl.uint16), (y >> 16).to(tl.uint16))
        codes = tl.inline_asm_elementwise(
            "mov.b32 $0, $1;" if KEEP_BIAS else "{ .reg .b32 m; mov.b32 m, 0x64006400; sub.rn.f16x2 $0, $1, m; }",
            "=r,r", [halves], dtype=tl.float16, is_pure=True, pack=2,
        )  # fmt: skip
    return tl.reshape(codes, (words.shape[0], words.shape[1] * PER_WORD))


@triton.jit
def _join_natural4(m0, m1, m2, m3):
    """``[..., 4]`` holding ``m0 .. m3`` in that order (``tl.join`` adds the last axis, so pairs interleave)."""
    return tl.join(tl.join(m0, m2), tl.join(m1, m3))


@triton.jit
def unpack_words_subnormal(words, BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """fp16 codes ``[R, W * PER_WORD]`` of packed words ``[R, W]`` in *pair order* (as :func:`unpack_words`), each
    code ``c`` at position ``p`` returned as the fp16 **subnormal** ``c * 2^(o - 24)``, ``o`` =
    :func:`subnormal_shift` ``(p)``: multiply a linear result of the codes (an MMA over them) by ``2^(24 - o)``.

    A field of ``BITS`` bits inside the low byte of a 16-bit lane *is* an fp16 subnormal once the other bits are
    cleared, so one LOP3 with an immediate mask gives two codes (the two lanes); the fields of each lane's high
    byte come from ``words >> 8`` (one shift per word). No fp16 bias, no subtraction, and no second constant that
    the register allocator re-materializes. Exact: ``c * 2^(o - 24)`` is representable, and a product with an
    fp16 factor stays far inside fp32's normal range. The MMA must not flush fp16 subnormals (Hopper's
    tensor cores do not; the GPU checks cover it).
    """
    HALF: tl.constexpr = PER_WORD // 2
    K8: tl.constexpr = min(8 // BITS, HALF)  # codes of a lane in its low byte
    M: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    x = words
    if PER_WORD * BITS == 16:  # a 16-bit row (1-bit keys, 16-token block): move its upper byte to bit 16
        x = (x & 0xFF) | ((x & 0xFF00) << 8)
    if HALF > K8:
        x = tl.join(x, x >> 8)  # [R, W, 2]: the lanes' low bytes, then their high bytes
    if K8 == 1:
        y = x & M
    elif K8 == 2:
        y = tl.join(x & M, x & (M << BITS))
    elif K8 == 4:
        y = _join_natural4(x & M, x & (M << BITS), x & (M << 2 * BITS), x & (M << 3 * BITS))
    else:  # 1-bit codes, eight per byte
        y = tl.join(
            _join_natural4(x & M, x & (M << 2), x & (M << 4), x & (M << 6)),
            _join_natural4(x & (M << 1), x & (M << 3), x & (M << 5), x & (M << 7)),
        )
    y = tl.reshape(y, (words.shape[0], words.shape[1] * HALF))
    if INTERPRET:
        lo = y.to(tl.uint16).to(tl.float16, bitcast=True)
        codes = tl.join(lo, (y >> 16).to(tl.uint16).to(tl.float16, bitcast=True))
    else:  # the register already holds both fp16 lanes: a move hands it over
        halves = tl.join(y.to(tl.uint16), (y >> 16).to(tl.uint16))
        codes = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [halves], dtype=tl.float16, is_pure=True, pack=2)
    return tl.reshape(codes, (words.shape[0], words.shape[1] * PER_WORD))


@triton.jit
def subnormal_shift(p, BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """Bit offset ``o`` of the code at pair-order position ``p`` inside its fp16 lane
    (:func:`unpack_words_subnormal`)."""
    K8: tl.constexpr = min(8 // BITS, PER_WORD // 2)
    return BITS * (((p % PER_WORD) // 2) % K8)


@triton.jit
def unpack_words_int8(words, BITS: tl.constexpr):
    """int8 codes ``[R, W * 32 / BITS]`` of packed uint32 words ``[R, W]``, in *quad order*
    (:func:`quad_order`): four codes per instruction pair.

    ``(w >> BITS * i) & (mask * 0x01010101)`` (one shift, one LOP3) leaves four codes in the four bytes of one
    register, byte ``j`` holding code ``j * 8 / BITS + i``, already int8 (codes are below 16). An inline-asm
    move with ``pack=4`` hands the register to Triton as four int8 lanes without re-packing. The interpreter
    (no PTX) extracts the bytes in plain Triton, same order, same values.
    """
    SHIFTS: tl.constexpr = 8 // BITS  # registers per word
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x01010101
    x = words
    if SHIFTS >= 8:
        x = tl.join(x, x >> (4 * BITS))
    if SHIFTS >= 4:
        x = tl.join(x, x >> (2 * BITS))
    if SHIFTS >= 2:
        x = tl.join(x, x >> BITS)
    # x [R, W, 2, ...]: the outermost join took the largest shift, so flat index i holds shift BITS * i.
    y = tl.reshape(x, (words.shape[0], words.shape[1] * SHIFTS)) & MASK
    y4 = tl.join(tl.join(y, y), tl.join(y, y))  # [R, W * SHIFTS, 2, 2]: four copies, one per byte
    y4 = tl.reshape(y4, (words.shape[0], words.shape[1] * SHIFTS * 4))
    if INTERPRET:
        byte = (tl.arange(0, words.shape[1] * SHIFTS * 4) % 4).to(tl.uint32)
        codes = ((y4 >> (byte * 8)[None, :]) & 0xFF).to(tl.int8)
    else:
        codes = tl.inline_asm_elementwise(
            "mov.b32 $0, $1;", "=r,r,r,r,r", [y4], dtype=tl.int8, is_pure=True, pack=4,
        )  # fmt: skip
    return codes


@triton.jit
def quad_order(p, BITS: tl.constexpr):
    """Index of the code that :func:`unpack_words_int8` puts at position ``p`` of a word's ``32 / BITS``."""
    PER_WORD: tl.constexpr = 32 // BITS
    SHIFTS: tl.constexpr = 8 // BITS
    q = p % PER_WORD
    return p - q + (q % 4) * SHIFTS + q // 4  # position q: register q // 4, byte q % 4


@triton.jit
def pair_order(p, PER_WORD: tl.constexpr):
    """Index of the code that :func:`unpack_words` puts at position ``p`` (pairs ``k``, ``k + PER_WORD / 2``)."""
    q = p % PER_WORD
    return p - q + q // 2 + (q % 2) * (PER_WORD // 2)


@triton.jit
def load_words(byte_ptrs, word_idx, mask, ROW_BITS: tl.constexpr):
    """uint32 words of packed rows (0 where ``mask`` is False): ``byte_ptrs`` point at row starts, ``word_idx``
    counts words into the row.

    Rows of 32 bits or more are read as uint32, 16-bit rows (1-bit keys of a 16-token block) as uint16; every
    row start is word aligned (16-byte sections, rows of whole words).
    """
    if ROW_BITS >= 32:
        return tl.load(byte_ptrs.to(tl.pointer_type(tl.uint32)) + word_idx, mask=mask, other=0)
    else:
        return tl.load(byte_ptrs.to(tl.pointer_type(tl.uint16)) + word_idx, mask=mask, other=0).to(tl.uint32)


@triton.jit
def decode_minmax(lo, hi, min_q, max_q):
    """fp32 group (min, max) from uint8 codes against the super range ``[lo, hi]``."""
    step = tl.math.div_rn(hi - lo, 255.0)
    return lo + min_q.to(tl.float32) * step, lo + max_q.to(tl.float32) * step


@triton.jit
def calibrate(mn, mx, BITS: tl.constexpr, eta, one_minus_2eta):
    """fp32 ``(s_cal, z_cal)``: ``(1 - 2 eta) * (mx - mn) / (2^b - 1)`` and ``mn + eta * (mx - mn)``."""
    s = tl.math.div_rn(mx - mn, float((1 << BITS) - 1))
    return one_minus_2eta * s, mn + eta * (mx - mn)


@triton.jit
def load_meta(page, meta_off, super_off, idx, mask, N: tl.constexpr, META_BITS: tl.constexpr, DTYPE: tl.constexpr):
    """The stored metadata of groups ``idx`` of one section of ``N`` groups, as loaded: ``(a, b, lo, hi)``
    (zeros where ``mask`` is False, which decode to scale and zero-point 0).

    16-bit: ``a, b`` = ``s_cal, z_cal`` in the model dtype ``DTYPE`` (``lo, hi`` unused zeros). 8-bit: ``a, b``
    = ``min_q, max_q`` (uint8) and ``lo, hi`` the fp32 super range at ``super_off``. Loads only, so that a loop
    can issue them a step ahead; :func:`group_params` turns them into numbers.
    """
    if META_BITS == 16:
        meta = (page + meta_off).to(tl.pointer_type(DTYPE))
        zero = tl.zeros(idx.shape, tl.float32)
        return tl.load(meta + idx, mask=mask, other=0), tl.load(meta + N + idx, mask=mask, other=0), zero, zero
    else:
        sup = (page + super_off).to(tl.pointer_type(tl.float32))
        a = tl.load(page + meta_off + idx, mask=mask, other=0)
        b = tl.load(page + meta_off + N + idx, mask=mask, other=0)
        return a, b, tl.load(sup, mask=mask, other=0.0), tl.load(sup + 1, mask=mask, other=0.0)


@triton.jit
def group_params(a, b, lo, hi, BITS: tl.constexpr, eta, one_minus_2eta, META_BITS: tl.constexpr):
    """fp32 ``(s_cal, z_cal)`` from :func:`load_meta`'s values: 16-bit metadata as stored; 8-bit decoded and
    calibrated as :func:`decode_minmax` and :func:`calibrate` do, with multiplications by reciprocals where
    they divide (attention needs the numbers to an ulp of fp32, not bit for bit; the store calls those two)."""
    if META_BITS == 16:
        return a.to(tl.float32), b.to(tl.float32)
    else:
        step = (hi - lo) * (1.0 / 255.0)
        mn = lo + a.to(tl.float32) * step
        mx = lo + b.to(tl.float32) * step
        return one_minus_2eta * ((mx - mn) * (1.0 / ((1 << BITS) - 1))), mn + eta * (mx - mn)


@triton.jit
def load_key_page(
    code_cols,
    meta_pages,
    cols_ok,
    pages_ok,
    codes_off,
    meta_off,
    super_off,
    D: tl.constexpr,
    B: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Loads of the key sections of ``NB`` pages: code words ``[D, NB * words per row]`` and :func:`load_meta`'s
    ``[D, NB]``. ``code_cols`` ``[NB * words per row]``: the code page of each word column (the lower layer's
    page for a shared layer); ``meta_pages`` ``[NB]``: the pages holding the metadata; ``cols_ok``,
    ``pages_ok``: which of them exist (the others load zeros)."""
    ROW_BITS: tl.constexpr = B * BITS
    PER_WORD: tl.constexpr = min(32, ROW_BITS) // BITS
    WORDS: tl.constexpr = B // PER_WORD
    d = tl.arange(0, D)
    c = tl.arange(0, NB * WORDS)
    words = load_words(
        code_cols[None, :] + codes_off + d[:, None] * (ROW_BITS // 8), (c % WORDS)[None, :], cols_ok[None, :],
        ROW_BITS,
    )  # fmt: skip
    a, b, lo, hi = load_meta(
        meta_pages[None, :], meta_off, super_off, d[:, None], pages_ok[None, :], D, META_BITS, DTYPE
    )
    return words, a, b, lo, hi


@triton.jit
def key_tile(
    words, a, b, lo, hi, B: tl.constexpr, BITS: tl.constexpr, eta, one_minus_2eta, META_BITS: tl.constexpr
):  # fmt: skip
    """Dequantized keys ``[D, NB * B]`` (channel, token) fp16 from :func:`load_key_page`'s values, tokens of
    each page in pair order, ``c * s[d] + z[d]`` per page."""
    D: tl.constexpr = words.shape[0]
    NB: tl.constexpr = a.shape[1]
    PER_WORD: tl.constexpr = min(32, B * BITS) // BITS
    codes = tl.reshape(unpack_words(words, BITS, PER_WORD), (D, NB, B))
    s, z = group_params(a, b, lo, hi, BITS, eta, one_minus_2eta, META_BITS)
    return tl.reshape(codes * s.to(tl.float16)[:, :, None] + z.to(tl.float16)[:, :, None], (D, NB * B))


@triton.jit
def load_value_rows(
    code_rows,
    meta_rows,
    pos,
    ok,
    codes_off,
    meta_off,
    super_off,
    D: tl.constexpr,
    B: tl.constexpr,
    NV: tl.constexpr,
    BITS: tl.constexpr,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Loads of ``N`` value rows: token ``n`` is row ``pos[n]`` of page ``code_rows[n]`` (metadata in
    ``meta_rows[n]``; zeros where ``ok[n]`` is False, which dequantize to exact zeros). Returns the code words
    ``[N, D * BITS / 32]`` and :func:`load_meta`'s values, one per group ``[N, NV]``, or one per channel (in
    pair order) ``[N, D]`` when a group is smaller than a word."""
    ROW_BITS: tl.constexpr = D * BITS
    GV: tl.constexpr = D // NV
    PER_WORD: tl.constexpr = 32 // BITS
    w = tl.arange(0, ROW_BITS // 32)
    words = load_words((code_rows + codes_off + pos * (ROW_BITS // 8))[:, None], w[None, :], ok[:, None], ROW_BITS)
    if GV % PER_WORD == 0:  # groups of whole words: the pair order stays inside a group
        idx = pos[:, None] * NV + tl.arange(0, NV)[None, :]
    else:
        idx = pos[:, None] * NV + (pair_order(tl.arange(0, D), PER_WORD) // GV)[None, :]
    a, b, lo, hi = load_meta(meta_rows[:, None], meta_off, super_off + 8, idx, ok[:, None], B * NV, META_BITS, DTYPE)
    return words, a, b, lo, hi


@triton.jit
def value_tile(words, a, b, lo, hi, BITS: tl.constexpr, eta, one_minus_2eta, META_BITS: tl.constexpr):
    """Dequantized values ``[N, D]`` fp16 from :func:`load_value_rows`'s values, channels in pair order
    (:func:`pair_order`)."""
    N: tl.constexpr = words.shape[0]
    D: tl.constexpr = words.shape[1] * (32 // BITS)
    codes = unpack_words(words, BITS, 32 // BITS)
    s, z = group_params(a, b, lo, hi, BITS, eta, one_minus_2eta, META_BITS)
    s, z = s.to(tl.float16), z.to(tl.float16)
    if s.shape[1] == D:  # one scale per channel
        return codes * s + z
    else:
        NV: tl.constexpr = s.shape[1]
        codes = tl.reshape(codes, (N, NV, D // NV))
        return tl.reshape(codes * s[:, :, None] + z[:, :, None], (N, D))

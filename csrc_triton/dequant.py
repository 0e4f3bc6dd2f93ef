"""Triton helpers that read one page (xquant_vllm/layout.py) and dequantize it: shared by every kernel.

Three layers, smallest first:

* :func:`load_words` and :func:`unpack_words` turn packed code rows into an fp16 tile. Rows are read as
  32-bit (or 16-bit) little-endian words, so element ``j`` of a row sits in word ``j // (32 / b)`` at bits
  ``b * (j % (32 / b))``: the LSB-first order of :mod:`xquant_vllm.quant.packing`, one load per word.
* :func:`decode_minmax` and :func:`calibrate` repeat the fp32 operations of xquant_vllm/quant/groups.py in
  order (8-bit min/max against the super range, then ``s_cal``, ``z_cal``); :func:`group_params` loads a
  page's metadata in either form and returns fp32 ``(s_cal, z_cal)``.
* :func:`key_tile` and :func:`value_tile` dequantize the key and value sections of several pages at once (a
  tile of tokens that spans pages, each column or row with its own page pointer), ``q * s + z`` in fp16:
  packed two to an instruction, and exact for the codes; it assumes ``|x| < 65504`` (fp16's range).

Bit-exactness with the reference needs the kernel compiled with ``enable_fp_fusion=False`` (no ``a * b + c``
turned into one FMA); attention does not need it and keeps fusion on.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _halves(x, WIDTH: tl.constexpr):
    """Fields of ``WIDTH`` bits -> ``[..., 2]``: the low and the high half (held by the same thread)."""
    return tl.join(x & ((1 << (WIDTH // 2)) - 1), x >> (WIDTH // 2))


@triton.jit
def unpack_words(words, BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """fp16 codes ``[R, W * PER_WORD]`` of packed words ``[R, W]`` (uint32; ``PER_WORD`` codes each, LSB first).

    The word is halved ``log2(PER_WORD)`` times with ``tl.join``, so one thread holds all codes of its words
    (no shared-memory shuffles); the last axes, flattened, count codes in order. Integer to float without a
    conversion instruction (quarter rate on Hopper): OR-ing a code into the mantissa of 1024 (fp16 0x6400)
    gives the fp16 ``1024 + code`` exactly, and one subtraction leaves ``code``.
    """
    W: tl.constexpr = PER_WORD * BITS
    x = words
    if PER_WORD >= 2:
        x = _halves(x, W)
    if PER_WORD >= 4:
        x = _halves(x, W // 2)
    if PER_WORD >= 8:
        x = _halves(x, W // 4)
    if PER_WORD >= 16:
        x = _halves(x, W // 8)
    if PER_WORD >= 32:
        x = _halves(x, W // 16)
    codes = (x.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return tl.reshape(codes, (words.shape[0], words.shape[1] * PER_WORD))


@triton.jit
def load_words(byte_ptrs, word_idx, ROW_BITS: tl.constexpr):
    """uint32 words of packed rows: ``byte_ptrs`` point at row starts, ``word_idx`` counts words into the row.

    Rows of 32 bits or more are read as uint32, 16-bit rows (1-bit keys of a 16-token block) as uint16; every
    row start is word aligned (16-byte sections, rows of whole words).
    """
    if ROW_BITS >= 32:
        return tl.load(byte_ptrs.to(tl.pointer_type(tl.uint32)) + word_idx)
    else:
        return tl.load(byte_ptrs.to(tl.pointer_type(tl.uint16)) + word_idx).to(tl.uint32)


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
def group_params(
    page,
    meta_off,
    super_off,
    idx,
    N: tl.constexpr,
    BITS: tl.constexpr,
    eta,
    one_minus_2eta,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """fp32 ``(s_cal, z_cal)`` of groups ``idx`` of one metadata section of ``N`` groups.

    16-bit: ``s_cal[N]`` then ``z_cal[N]`` in the model dtype ``DTYPE``, used as stored. 8-bit: ``min_q[N]``
    then ``max_q[N]`` (uint8) decoded against the fp32 pair ``lo, hi`` at ``super_off``, then calibrated.
    """
    if META_BITS == 16:
        meta = (page + meta_off).to(tl.pointer_type(DTYPE))
        return tl.load(meta + idx).to(tl.float32), tl.load(meta + N + idx).to(tl.float32)
    else:
        sup = (page + super_off).to(tl.pointer_type(tl.float32))
        mn, mx = decode_minmax(
            tl.load(sup), tl.load(sup + 1), tl.load(page + meta_off + idx), tl.load(page + meta_off + N + idx)
        )
        return calibrate(mn, mx, BITS, eta, one_minus_2eta)


@triton.jit
def key_tile(
    code_cols,
    meta_pages,
    codes_off,
    meta_off,
    super_off,
    D: tl.constexpr,
    B: tl.constexpr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    eta,
    one_minus_2eta,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Dequantized keys ``[D, NB * B]`` (channel, token) fp16 of ``NB`` pages, ``q * s[d] + z[d]`` per page.

    ``code_cols`` ``[NB * words per row]``: the code page of each word column (the lower layer's page for a
    shared layer); ``meta_pages`` ``[NB]``: the pages holding the metadata.
    """
    ROW_BITS: tl.constexpr = B * BITS
    PER_WORD: tl.constexpr = (32 if ROW_BITS >= 32 else ROW_BITS) // BITS
    WORDS: tl.constexpr = B // PER_WORD
    d = tl.arange(0, D)
    c = tl.arange(0, NB * WORDS)
    words = load_words(code_cols[None, :] + codes_off + d[:, None] * (ROW_BITS // 8), (c % WORDS)[None, :], ROW_BITS)
    codes = tl.reshape(unpack_words(words, BITS, PER_WORD), (D, NB, B))
    s, z = group_params(
        meta_pages[None, :], meta_off, super_off, d[:, None], D, BITS, eta, one_minus_2eta, META_BITS, DTYPE
    )
    return tl.reshape(codes * s.to(tl.float16)[:, :, None] + z.to(tl.float16)[:, :, None], (D, NB * B))


@triton.jit
def value_tile(
    code_rows,
    meta_rows,
    pos,
    codes_off,
    meta_off,
    super_off,
    D: tl.constexpr,
    B: tl.constexpr,
    NV: tl.constexpr,
    BITS: tl.constexpr,
    eta,
    one_minus_2eta,
    META_BITS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Dequantized values ``[N, D]`` fp16 of ``N`` tokens: token ``n`` is row ``pos[n]`` of page ``code_rows[n]``
    (metadata in ``meta_rows[n]``), ``NV`` groups of ``D / NV`` channels per token."""
    ROW_BITS: tl.constexpr = D * BITS
    GV: tl.constexpr = D // NV
    N: tl.constexpr = pos.shape[0]
    w = tl.arange(0, ROW_BITS // 32)
    words = load_words((code_rows + codes_off + pos * (ROW_BITS // 8))[:, None], w[None, :], ROW_BITS)
    codes = tl.reshape(unpack_words(words, BITS, 32 // BITS), (N, NV, GV))
    idx = pos[:, None] * NV + tl.arange(0, NV)[None, :]
    s, z = group_params(
        meta_rows[:, None], meta_off, super_off + 8, idx, B * NV, BITS, eta, one_minus_2eta, META_BITS, DTYPE
    )
    return tl.reshape(codes * s.to(tl.float16)[:, :, None] + z.to(tl.float16)[:, :, None], (N, D))

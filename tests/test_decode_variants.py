"""The decode kernel's key-path variants (csrc_triton/decode.py), interpreted on the CPU, against the reference.

* ``KEY_SUBNORMAL``: key codes unpacked as fp16 subnormals ``c * 2^(o - 24)`` (one LOP3 per two codes, no fp16
  bias to subtract), the scores multiplied back by ``2^(24 - o)`` per key column. Exact, so it must meet the
  same tolerances as the fp16 path.
* ``KEY_INT8``: int8 key codes times the page-scaled query rounded to int8 per stacked row (``1``), or with the
  rounding residual as a second int8 operand (``2``). ``1`` is an approximation of the reference: its own
  looser bound below, and the test shows that it is looser than the fp16 path's error.

Cases are ragged batches (past 0, 1, a partial block, a block, blocks plus a tail, a request with no query row;
shuffled block ids), GQA 1-4, head sizes 64 and 128, bits 1/2/4, 16- and 8-bit metadata, several splits and
tiles, ``out`` NaN-poisoned before each run. The variants are module defaults read at launch time
(``decode.KEY_SUBNORMAL``, ``decode.KEY_INT8``), so the public entry ``paged_attention_triton`` runs them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated: no GPU in CI

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_cases import layer_pair, make_case, ragged_past_lens  # noqa: E402
from xquant_vllm.kernels import decode  # noqa: E402
from xquant_vllm.kernels.attention import paged_attention_triton  # noqa: E402
from xquant_vllm.kernels.dequant import (  # noqa: E402
    load_words,
    pair_order,
    quad_order,
    subnormal_shift,
    unpack_words_int8,
    unpack_words_subnormal,
)
from xquant_vllm.quant.packing import pack_bits  # noqa: E402

pytestmark = pytest.mark.triton

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # as tests/test_attention_triton.py
INT8_TOL = 1e-2  # KEY_INT8=1: the query rounded to 127 steps per row (see the module docstring)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "some output element was never written"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run(case, monkeypatch, *, subnormal=False, int8=0, splits=None, tile=None) -> torch.Tensor:
    monkeypatch.setattr(decode, "KEY_SUBNORMAL", subnormal)
    monkeypatch.setattr(decode, "KEY_INT8", int8)
    out = case.poisoned_out()
    paged_attention_triton(*case.attention_args(out), num_splits=splits, tile_tokens=tile)
    return out


CASES = [  # bits, head size, query heads per KV head, dtype, block, metadata bits, value group, splits, tile
    ((2, 2), 128, 4, torch.float16, 32, 16, 32, None, None),  # the 8B shape's 2-bit layer, 4 pages a step
    ((1, 1), 64, 3, torch.bfloat16, 32, 16, 32, 2, 64),  # 1-bit keys (16-bit words), two splits
    ((4, 2), 128, 1, torch.float16, 32, 16, 32, 3, None),  # 4-bit keys: codes in both bytes of a lane
    ((2, 1), 64, 4, torch.float16, 64, 8, 64, None, None),  # the xquant preset's page: block 64, 8-bit meta
    ((1, 2), 128, 4, torch.bfloat16, 16, 16, 16, 2, 32),  # a 16-token block
]


def make(bits, D, G, dtype, B, meta, vg, seed):
    lq, _ = layer_pair(*bits, head_size=D, block=B, v_group=vg, meta_bits=meta)
    past = ragged_past_lens(B) + [5 * B + 5, 2 * B]
    q_lens = [1] * (len(past) - 1) + [0]
    return make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=2, num_q_heads=2 * G, dtype=dtype, seed=seed)


@pytest.mark.parametrize("bits, D, G, dtype, B, meta, vg, splits, tile", CASES)
def test_subnormal_keys_match_reference(bits, D, G, dtype, B, meta, vg, splits, tile, monkeypatch):
    case = make(bits, D, G, dtype, B, meta, vg, seed=sum(bits) * D + B)
    ref = case.expected_attention()
    base = rel(run(case, monkeypatch, splits=splits, tile=tile), ref)
    err = rel(run(case, monkeypatch, subnormal=True, splits=splits, tile=tile), ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"
    # Exact unpacking: no worse than the fp16-bias path beyond rounding noise.
    assert err < 1.5 * base + 1e-4, f"subnormal {err:.2e} vs fp16 path {base:.2e}"


@pytest.mark.parametrize("bits, D, G, dtype, B, meta, vg, splits, tile", CASES[:4])
def test_int8_keys_error_against_reference(bits, D, G, dtype, B, meta, vg, splits, tile, monkeypatch):
    case = make(bits, D, G, dtype, B, meta, vg, seed=7 * D + B)
    ref = case.expected_attention()
    base = rel(run(case, monkeypatch, splits=splits, tile=tile), ref)
    one = rel(run(case, monkeypatch, int8=1, splits=splits, tile=tile), ref)
    two = rel(run(case, monkeypatch, int8=2, splits=splits, tile=tile), ref)
    assert one < INT8_TOL, f"int8 query: relative error {one:.2e}"
    assert two < TOL[dtype], f"int8 query + residual: relative error {two:.2e}"
    assert two < 1.5 * base + 1e-4, f"int8 + residual {two:.2e} vs fp16 path {base:.2e}"


def test_int8_rounding_is_visible_in_fp16(monkeypatch):
    """The single int8 query is an approximation: on an fp16 case it is measurably worse than the exact paths
    (so the looser bound above is needed, and the test would notice a silent fallback to the fp16 path)."""
    case = make((2, 2), 128, 4, torch.float16, 32, 16, 32, seed=3)
    ref = case.expected_attention()
    base = rel(run(case, monkeypatch), ref)
    one = rel(run(case, monkeypatch, int8=1), ref)
    assert one > 2 * base, f"int8 {one:.2e} vs fp16 path {base:.2e}"


@triton.jit
def _unpack_kernel(row_ptr, out_ptr, order_ptr, scale_ptr, R: tl.constexpr, BITS: tl.constexpr,
                   ROW_CODES: tl.constexpr, INT8: tl.constexpr):  # fmt: skip
    ROW_BITS: tl.constexpr = ROW_CODES * BITS
    PER_WORD: tl.constexpr = 32 // BITS if INT8 else min(32, ROW_BITS) // BITS
    r = tl.arange(0, R)
    w = tl.arange(0, ROW_CODES // PER_WORD)
    ok = tl.full([R, ROW_CODES // PER_WORD], 1, tl.int1)
    words = load_words((row_ptr + r * (ROW_BITS // 8))[:, None], w[None, :], ok, ROW_BITS)
    j = tl.arange(0, ROW_CODES)
    if INT8:
        tl.store(out_ptr + r[:, None] * ROW_CODES + j[None, :], unpack_words_int8(words, BITS).to(tl.float32))
        tl.store(order_ptr + j, quad_order(j, BITS))
    else:
        codes = unpack_words_subnormal(words, BITS, PER_WORD).to(tl.float32)
        tl.store(out_ptr + r[:, None] * ROW_CODES + j[None, :], codes)
        tl.store(order_ptr + j, pair_order(j, PER_WORD))
        tl.store(scale_ptr + j, subnormal_shift(j, BITS, PER_WORD))


@pytest.mark.parametrize("bits, row_codes", [(1, 32), (1, 16), (2, 32), (2, 64), (4, 64)])
def test_subnormal_unpack_gives_every_code_exactly(bits, row_codes):
    codes = torch.randint(0, 2**bits, (4, row_codes), generator=torch.Generator().manual_seed(bits + row_codes))
    codes[0] = 2**bits - 1  # every field at its largest code
    out = torch.full((4, row_codes), float("nan"))
    order = torch.full((row_codes,), -1, dtype=torch.int32)
    shift = torch.full((row_codes,), -1, dtype=torch.int32)
    _unpack_kernel[(1,)](pack_bits(codes, bits), out, order, shift, 4, bits, row_codes, False)
    assert sorted(order.tolist()) == list(range(row_codes)), "pair order is a permutation of the row"
    assert ((shift >= 0) & (shift + bits <= 8)).all(), "every field sits in the low byte of its lane"
    assert torch.equal(out * torch.exp2(24.0 - shift.float()), codes[:, order.long()].float())


@pytest.mark.parametrize("bits, row_codes", [(1, 32), (2, 32), (2, 64), (4, 64)])
def test_int8_unpack_gives_every_code_at_its_quad_order_position(bits, row_codes):
    codes = torch.randint(0, 2**bits, (4, row_codes), generator=torch.Generator().manual_seed(bits * row_codes))
    out = torch.full((4, row_codes), float("nan"))
    order = torch.full((row_codes,), -1, dtype=torch.int32)
    _unpack_kernel[(1,)](pack_bits(codes, bits), out, order, order, 4, bits, row_codes, True)
    assert sorted(order.tolist()) == list(range(row_codes)), "quad order is a permutation of the row"
    assert torch.equal(out, codes[:, order.long()].float())

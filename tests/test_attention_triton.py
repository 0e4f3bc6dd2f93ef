"""The Triton paged-attention kernel, interpreted on the CPU, against the reference attention.

Every case is a ragged batch (past lengths 0, 1, a partial block, a block, blocks plus a tail; shuffled block
ids) built by tests/kernel_cases.py through the reference quantizer; ``out`` is NaN-poisoned before each run.
Shapes are the smallest that still cover each case: the whole module takes 20-35 s on 2 shared cores.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated: no GPU in CI

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernel_cases import KernelCase, layer_pair, make_case, ragged_past_lens  # noqa: E402
from xquant_vllm.kernels import build_step_plan  # noqa: E402
from xquant_vllm.kernels.attention import paged_attention_fp_triton, paged_attention_triton  # noqa: E402
from xquant_vllm.kernels.dequant import load_words, pair_order, unpack_words  # noqa: E402
from xquant_vllm.quant.packing import pack_bits  # noqa: E402

pytestmark = pytest.mark.triton

# ||out - ref|| / ||ref||: the kernel dequantizes to fp16, the reference to the model dtype.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run(case: KernelCase, num_splits: int | None = None, tile_tokens: int | None = None, **knobs) -> torch.Tensor:
    out = case.poisoned_out()
    paged_attention_triton(*case.attention_args(out), num_splits=num_splits, tile_tokens=tile_tokens, **knobs)
    return out


def full_precision(case: KernelCase) -> torch.Tensor:
    """Attention over the unquantized history: what the kernel must *not* return for low-bit caches."""
    outs, row = [], 0
    for k, v, p, n in zip(case.hist_k, case.hist_v, case.past_lens, case.q_lens):
        q = case.query[row : row + n].float().transpose(0, 1)
        mask = torch.arange(p + n)[None, :] <= torch.arange(n)[:, None] + p
        o = F.scaled_dot_product_attention(
            q, k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask, scale=case.scale, enable_gqa=True
        )
        outs.append(o.transpose(0, 1).to(case.dtype))
        row += n
    return torch.cat(outs)


def check(case: KernelCase, out: torch.Tensor) -> None:
    ref = case.expected_attention()
    assert not out.isnan().any(), "some output element was never written"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[case.dtype], f"relative error {err:.2e}"
    # The quantized past matters: the reference differs from full-precision attention far more than we do.
    if max(case.past_lens) >= case.block:
        gap = ((full_precision(case).float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < gap / 5, f"error {err:.2e} is not small against the quantization effect {gap:.2e}"


def past_and_decode(B: int) -> tuple[list[int], list[int]]:
    """The ragged past lengths, five blocks and a tail, and a request with no query rows (past 2B)."""
    past = ragged_past_lens(B) + [5 * B + 5, 2 * B]
    return past, [1] * (len(past) - 1) + [0]


@pytest.mark.parametrize(
    "bits, head_size, group, dtype, splits, tile",
    [
        ((1, 1), 64, 4, torch.float16, 2, 32),  # one page per step, two splits
        ((2, 2), 128, 3, torch.bfloat16, None, None),  # four pages per step, the last step partial
        ((4, 4), 256, 1, torch.bfloat16, 3, None),  # two pages per step, two splits
        ((2, 4), 64, 3, torch.float16, None, 64),
        ((4, 1), 128, 4, torch.bfloat16, 2, None),  # the second split holds a partial step
    ],
)
def test_decode_matches_reference(bits, head_size, group, dtype, splits, tile):
    B = 32
    lq, _ = layer_pair(*bits, head_size=head_size, block=B, v_group=32)
    past, q_lens = past_and_decode(B)
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=2, num_q_heads=2 * group, dtype=dtype, seed=1)
    check(case, run(case, splits, tile))


def test_decode_kernel_knobs_and_generic_kernel_agree():
    """Loads issued in the step (no prefetch), an 8-head group (M = 32 stacked rows) and the generic kernel on the
    same decode batch: each matches the reference."""
    B = 32
    lq, _ = layer_pair(2, 1, head_size=64, block=B, v_group=32)
    past, q_lens = past_and_decode(B)
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=1, num_q_heads=8, dtype=torch.float16, seed=8)
    check(case, run(case, 2, None, prefetch=False))
    check(case, run(case, None, 64, generic=True))
    check(case, run(case, None, None, key_code_bias=True))  # the +1024 of the key codes removed in the row bias


def test_decode_launch_ignores_host_lengths():
    """The decode grid comes from shapes alone (CUDA graphs): a plan whose host-side maxima are stale gives the
    same output bit for bit."""
    B = 32
    lq, _ = layer_pair(2, 2, head_size=64, block=B, v_group=32)
    past, q_lens = past_and_decode(B)
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=2, num_q_heads=4, seed=9)
    out = run(case)
    case.plan = dataclasses.replace(case.plan, max_past_len=0)
    assert torch.equal(run(case), out)


@pytest.mark.parametrize("dtype, group", [(torch.float16, 4), (torch.bfloat16, 3)])
def test_chunked_prefill_matches_reference(dtype, group):
    B = 32
    lq, _ = layer_pair(2, 1, head_size=64, block=B, v_group=16)
    past = ragged_past_lens(B) + [3 * B + 7]
    q_lens = [5, 7, 1, B + 3, 2 * B + 1, 0]
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=2, num_q_heads=2 * group, dtype=dtype, seed=2)
    check(case, run(case))


@pytest.mark.parametrize("shared, q_len", [((True, True), 1), ((True, False), 3), ((False, True), 1)])
def test_shared_upper_layer_reads_lower_codes(shared, q_len):
    B = 32
    lq, lower = layer_pair(1, 1, head_size=128, block=B, v_group=32, k_shared=shared[0], v_shared=shared[1])
    past = ragged_past_lens(B) + [3 * B + 1]
    case = make_case(
        lq, past_lens=past, q_lens=[q_len] * len(past), num_kv_heads=1, num_q_heads=4, dtype=torch.bfloat16,
        lower_lq=lower, seed=3,
    )  # fmt: skip
    check(case, run(case, 2 if q_len == 1 else None, 64))


@pytest.mark.parametrize("q_len, splits", [(1, 2), (4, None)])
def test_eight_bit_metadata(q_len, splits):
    """The xquant-max page: block 64, value groups of 64, 8-bit min/max, the upper layer sharing its keys."""
    B = 64
    lq, lower = layer_pair(1, 2, head_size=128, block=B, v_group=64, meta_bits=8, k_shared=True)
    past = ragged_past_lens(B) + [3 * B + 9]
    case = make_case(
        lq, past_lens=past, q_lens=[q_len] * len(past), num_kv_heads=2, num_q_heads=8, dtype=torch.float16,
        lower_lq=lower, seed=4,
    )  # fmt: skip
    check(case, run(case, splits))


def test_block_of_16_reads_16_bit_words():
    """1-bit key rows of a 16-token block are 2 bytes: the unpacker switches to 16-bit words."""
    lq, _ = layer_pair(1, 1, head_size=64, block=16, v_group=16)
    past, q_lens = past_and_decode(16)
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=1, num_q_heads=3, seed=5)
    check(case, run(case, 2, 32))


def test_empty_request_does_not_disturb_others():
    B = 32
    lq, _ = layer_pair(2, 2, head_size=64, block=B, v_group=32)
    past, q_lens = [2 * B + 3, 0, 5 * B, B], [1, 0, 1, 0]
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=2, num_q_heads=4, seed=6)
    out = run(case, 3, 64)
    check(case, out)
    # The same two requests alone: bit-identical rows.
    alone = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=2, num_q_heads=4, seed=6)
    keep = torch.tensor([0, 2])
    plan = alone.plan
    alone.plan = build_step_plan(
        torch.tensor([0, 1, 2], dtype=torch.int32),
        plan.past_lens[keep],
        plan.block_table[keep],
        plan.tail_slot[keep],
        B,
    )
    assert torch.equal(run(alone, 3, 64), out)


def test_fp_baseline_kernel_matches_plain_attention():
    """The benchmark's bf16 paged baseline (same kernel, ``FP_PAGES``) is exact attention over its pages."""
    B, H, D = 32, 2, 64
    lq, _ = layer_pair(2, 2, head_size=D, block=B, v_group=32)
    past, q_lens = [0, 1, B + 5, 3 * B], [1, 3, 1, 2]
    case = make_case(lq, past_lens=past, q_lens=q_lens, num_kv_heads=H, num_q_heads=2 * H, dtype=torch.bfloat16, seed=7)
    nblocks = int(case.plan.block_table.max()) + 1
    k_cache = torch.full((nblocks, H, B, D), float("nan"), dtype=case.dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    for r, p in enumerate(past):
        for j in range(-(-p // B)):
            n = min(B, p - j * B)
            blk = int(case.plan.block_table[r, j])
            k_cache[blk, :, :n] = case.hist_k[r][j * B : j * B + n].transpose(0, 1)
            v_cache[blk, :, :n] = case.hist_v[r][j * B : j * B + n].transpose(0, 1)
    k_cache, v_cache = k_cache.nan_to_num(7.0), v_cache.nan_to_num(7.0)  # unused rows: finite but wrong
    out = case.poisoned_out()
    paged_attention_fp_triton(
        case.query, case.key, case.value, k_cache, v_cache, case.plan, case.scale, out, num_splits=2, tile_tokens=64
    )
    ref = full_precision(case)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert not out.isnan().any() and err < TOL[case.dtype], f"relative error {err:.2e}"


def test_unsupported_shapes_name_the_field():
    lq, _ = layer_pair(2, 2, head_size=64, block=16, v_group=16)
    case = make_case(lq, past_lens=[3], q_lens=[1])
    plan = case.plan
    case.plan = build_step_plan(plan.query_start_loc, plan.past_lens, plan.block_table, plan.tail_slot, 32)
    with pytest.raises(ValueError, match="block_size"):
        run(case)
    case.plan = plan
    case.query = case.query.repeat(1, 1, 2)[..., :96]  # head size 96
    with pytest.raises(ValueError, match="head_size"):
        run(case)


@triton.jit
def _unpack_kernel(row_ptr, out_ptr, order_ptr, R: tl.constexpr, BITS: tl.constexpr, ROW_CODES: tl.constexpr):
    ROW_BITS: tl.constexpr = ROW_CODES * BITS
    PER_WORD: tl.constexpr = min(32, ROW_BITS) // BITS
    r = tl.arange(0, R)
    w = tl.arange(0, ROW_CODES // PER_WORD)
    ok = tl.full([R, ROW_CODES // PER_WORD], 1, tl.int1)
    words = load_words((row_ptr + r * (ROW_BITS // 8))[:, None], w[None, :], ok, ROW_BITS)
    j = tl.arange(0, ROW_CODES)
    tl.store(out_ptr + r[:, None] * ROW_CODES + j[None, :], unpack_words(words, BITS, PER_WORD))
    tl.store(order_ptr + j, pair_order(j, PER_WORD))


@pytest.mark.parametrize("bits, row_codes", [(1, 32), (1, 16), (2, 32), (4, 64), (2, 128)])
def test_unpack_words_gives_every_code_at_its_pair_order_position(bits, row_codes):
    codes = torch.randint(0, 2**bits, (4, row_codes), generator=torch.Generator().manual_seed(bits * row_codes))
    rows = pack_bits(codes, bits)
    out = torch.full((4, row_codes), float("nan"), dtype=torch.float16)
    order = torch.full((row_codes,), -1, dtype=torch.int32)
    _unpack_kernel[(1,)](rows, out, order, 4, bits, row_codes)
    assert sorted(order.tolist()) == list(range(row_codes)), "pair order is a permutation of the row"
    assert torch.equal(out, codes[:, order.long()].half())

"""The Triton quantize-and-store kernels: bit-exact with the reference pages and tails.

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set here, before Triton compiles
anything); with CUDA the same cases run compiled on the GPU.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_cases import PAGE_POISON, KernelCase, layer_pair, make_case  # noqa: E402
from xquant_vllm.kernels.store import store_kv_triton  # noqa: E402

from xquant_vllm.quant.kv import key_meta, value_meta  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B = 16

# (past_lens, q_lens). Decode: two rows complete a block from the tail, the others only fill it.
# Chunked: a fresh request's run that stays in the tail; a run starting mid-block that completes two blocks and
# leaves two rows; one starting mid-block that ends exactly on the block's end; a run that is exactly one block;
# one that stays in the tail; a request with no rows.
STEPS = {
    "decode": ([B - 1, 2 * B - 1, 0, 5, B], [1, 1, 1, 1, 1]),
    "padded": ([3, B - 1, 0, 7, 3 * B - 1, 2], [1, 1, 0, 1, 1, 0]),  # a captured batch's padding rows have no token
    "chunked": ([0, 1, B // 2 + 1, B, 2 * B + 3, 3], [3, 2 * B + 1, B // 2 - 1, B, 5, 0]),
}


def check_store(case: KernelCase, device_store: bool = False) -> None:
    """Run the kernel on ``case`` and compare pages and tails byte for byte with the reference.

    ``device_store``: the decode path, from a plan without the store's index arrays (each row decides on the device).
    """
    expected = case.expected_store()
    untouched = torch.ones(case.pages.shape[0], dtype=torch.bool)
    untouched[case.plan.full_block_ids.long()] = False
    if device_store:
        empty = torch.zeros(0, dtype=torch.int32)
        store_only = ("full_block_ids", "full_tail_slot", "full_tail_count", "full_row_start", "tail_rows", "tail_dst")
        case.plan = dataclasses.replace(case.plan, device_store=True, **dict.fromkeys(store_only, empty))
    dev = case.to(DEVICE)
    store_kv_triton(*dev.store_args())
    got = (dev.pages.cpu(), dev.tail_k.cpu(), dev.tail_v.cpu())
    for g, want, name in zip(got, expected, ("pages", "tail_k", "tail_v")):
        bad = (g != want).nonzero()
        assert bad.numel() == 0, (
            f"{name}: {bad.shape[0]} elements differ from the reference, first at {bad[0].tolist()}"
        )
    assert torch.equal(got[0][untouched], case.pages[untouched]), "a page outside the plan was written"
    assert bool((case.pages[untouched] == PAGE_POISON).any()), "the case has no poisoned spare page"


def case_for(
    bits=(2, 2), *, step="chunked", head_size=64, meta_bits=16, shared=(False, False), dtype=torch.float16, **kw
) -> KernelCase:
    lq, lower = layer_pair(
        *bits, head_size=head_size, block=B, v_group=16, meta_bits=meta_bits, k_shared=shared[0], v_shared=shared[1]
    )
    past, q = STEPS[step]
    return make_case(
        lq,
        past_lens=past,
        q_lens=q,
        num_kv_heads=kw.pop("num_kv_heads", 2),
        dtype=dtype,
        lower_lq=lower if any(shared) else None,
        **kw,
    )


@pytest.mark.parametrize("step", ["decode", "chunked"])
@pytest.mark.parametrize("bits", [(1, 1), (2, 2), (4, 4), (2, 1), (1, 4)])
def test_bits(step: str, bits: tuple[int, int]) -> None:
    check_store(case_for(bits, step=step))


@pytest.mark.parametrize(
    "step,bits,meta_bits,shared,dtype,head_size",
    [
        ("decode", (2, 2), 16, (False, False), torch.float16, 64),
        ("padded", (1, 2), 8, (False, False), torch.bfloat16, 128),
        ("padded", (2, 1), 16, (True, False), torch.bfloat16, 64),
        ("decode", (1, 1), 8, (True, True), torch.float16, 256),
        ("padded", (4, 4), 16, (False, True), torch.float16, 64),
    ],
)
def test_decode_store_decides_on_the_device(step, bits, meta_bits, shared, dtype, head_size) -> None:
    """The decode path (one launch, no host-sized arrays) writes what the two-launch path writes, padding rows
    included (they write nothing)."""
    case = case_for(bits, step=step, meta_bits=meta_bits, shared=shared, dtype=dtype, head_size=head_size)
    check_store(case, device_store=True)


def test_decode_store_refuses_a_prefill_plan() -> None:
    case = case_for((2, 2), step="chunked")
    case.plan = dataclasses.replace(case.plan, device_store=True)
    with pytest.raises(ValueError, match="max_query_len"):
        store_kv_triton(*case.store_args())


@pytest.mark.parametrize(
    "meta_bits,shared,dtype",
    [
        (8, (False, False), torch.float16),
        (8, (False, False), torch.bfloat16),
        (16, (True, True), torch.bfloat16),
        (8, (True, True), torch.float16),
        (16, (True, False), torch.float16),
        (8, (False, True), torch.bfloat16),
    ],
)
def test_meta_and_shared_layer(meta_bits: int, shared: tuple[bool, bool], dtype: torch.dtype) -> None:
    """8-bit metadata and the upper layer of a pair (metadata only for a shared tensor)."""
    check_store(case_for((2, 1), meta_bits=meta_bits, shared=shared, dtype=dtype))


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_sizes(head_size: int, dtype: torch.dtype) -> None:
    check_store(case_for((1, 2), step="decode", head_size=head_size, dtype=dtype, num_kv_heads=1))


def _ties(n: int, H: int, D: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers in [0, 6] (ties at .5 for 2 bits: s = 2) and constant channels / tokens (s = 0)."""
    k = torch.randint(0, 7, (n, H, D), generator=gen).float()
    v = torch.randint(0, 7, (n, H, D), generator=gen).float()
    k[:, :, ::5] = 3.0
    v[::3] = -1.5
    return k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("meta_bits", [16, 8])
def test_ties_and_constant_groups(meta_bits: int) -> None:
    """Round half to even and zero-width groups, where a sloppy rint or division shows."""
    check_store(case_for((2, 2), meta_bits=meta_bits, history=_ties))


def _outward_steps(
    n: int, H: int, D: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks whose 8-bit min (even blocks) or max (odd blocks) codes the reference stepped outward, K and V.

    Stepping happens where fp32 rounding put a decoded bound inside its group: in well under 1% of random
    blocks, so candidates are drawn in bulk and kept where the stored code differs from the plain floor/ceil.
    """
    lq = layer_pair(2, 2, head_size=D, block=B, v_group=16, meta_bits=8)[0]
    nb, nv, N = -(-n // B), D // 16, 1024

    def stepped(meta, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, step = meta.lo.unsqueeze(-1), ((meta.hi - meta.lo) / 255.0).unsqueeze(-1)
        lower = meta.min_q.float() != torch.floor((mn - lo) / step).clamp(0, 255)
        upper = meta.max_q.float() != torch.ceil((mx - lo) / step).clamp(0, 255)
        return lower.flatten(1).any(1), upper.flatten(1).any(1)

    def pick(x: torch.Tensor, flags: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        lower, upper = (f.nonzero().flatten() for f in flags)
        assert lower.numel() >= nb and upper.numel() >= nb, "too few stepped candidates: raise N"
        order = torch.stack([lower[:nb], upper[:nb]], 1).flatten()[:nb]
        return x.reshape(N, B, H, D)[order].flatten(0, 1)[:n]

    k = (torch.randn(N * B, H, D, generator=gen) * 3 + 1).to(dtype)
    v = (torch.randn(N * B, H, D, generator=gen) * 3 + 1).to(dtype)
    kg = k.float().reshape(N, B, H, D)
    vg = v.float().reshape(N, B, H, nv, 16).permute(0, 2, 1, 3, 4).reshape(N, H, B * nv, 16)
    k_flags = stepped(key_meta(k, lq), kg.amin(1), kg.amax(1))
    v_flags = stepped(value_meta(v, lq), vg.amin(-1), vg.amax(-1))
    return pick(k, k_flags), pick(v, v_flags)


def test_8bit_meta_outward_steps() -> None:
    """8-bit min/max codes stepped outward where fp32 rounding fell inside the group, like the reference."""
    lq = layer_pair(2, 2, head_size=64, block=B, v_group=16, meta_bits=8)[0]
    check_store(
        make_case(
            lq, past_lens=[B + 3, 5], q_lens=[2 * B, B], num_kv_heads=2, dtype=torch.bfloat16, history=_outward_steps
        )
    )


def test_strided_rows() -> None:
    """Key/value rows as views into a fused qkv tensor (row stride > H * D), three KV heads."""
    case = case_for((2, 1), num_kv_heads=3, num_q_heads=3)
    qkv = torch.cat([case.query, case.key, case.value], dim=1)
    H = case.key.shape[1]
    case.key, case.value = qkv[:, H : 2 * H], qkv[:, 2 * H :]
    assert case.key.stride(0) == 3 * H * case.lq.head_size
    check_store(case)

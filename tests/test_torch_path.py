"""The PyTorch path of the kernel interface against the reference quantizers and reference attention."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CacheSim, KernelCase, layer_pair, make_case, ragged_past_lens
from xquant_vllm.kernels import _impl, paged_attention, store_kv
from xquant_vllm.kernels.torch_ops import paged_attention_torch, store_kv_torch

B = 16
TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}

BITS = [(1, 1), (2, 2), (4, 4), (2, 1), (1, 4)]


def case_for(
    bits=(2, 2), *, head_size=64, meta_bits=16, shared=(False, False), q_lens=None, past_lens=None, **kw
) -> KernelCase:
    lq, lower = layer_pair(
        *bits, head_size=head_size, block=B, v_group=16, meta_bits=meta_bits, k_shared=shared[0], v_shared=shared[1]
    )
    past = past_lens if past_lens is not None else ragged_past_lens(B)
    q = q_lens if q_lens is not None else [1] * len(past)
    return make_case(lq, past_lens=past, q_lens=q, lower_lq=lower if any(shared) else None, **kw)


def attend(case: KernelCase) -> torch.Tensor:
    out = case.poisoned_out()
    paged_attention_torch(*case.attention_args(out))
    return out


def check_attention(case: KernelCase) -> None:
    out = attend(case)
    tol = TOL[case.dtype]
    torch.testing.assert_close(out, case.expected_attention(), rtol=tol, atol=tol)


# ---- attention ------------------------------------------------------------------------------------------------

# Decode (one row each), chunked prefill (a chunk that completes blocks, one starting mid-block, a request with no
# rows this step), and a fresh prefill next to a decode.
STEPS = {
    "decode": (ragged_past_lens(B), [1, 1, 1, 1, 1]),
    "chunked": (ragged_past_lens(B), [3, 2 * B + 1, 0, B, 5]),
    "prefill+decode": ([0, 2 * B + 3, 0], [B + 2, 1, 0]),
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("bits", BITS)
def test_attention_bits(step: str, bits: tuple[int, int]) -> None:
    past, q = STEPS[step]
    check_attention(
        case_for(bits, past_lens=past, q_lens=q, num_kv_heads=2, num_q_heads=6, seed=list(STEPS).index(step))
    )


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_attention_shapes(head_size: int, dtype: torch.dtype, gqa: int) -> None:
    past, q = STEPS["chunked"]
    check_attention(
        case_for(
            (2, 1), head_size=head_size, past_lens=past, q_lens=q, num_kv_heads=2, num_q_heads=2 * gqa, dtype=dtype
        )
    )


@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("shared", [(True, True), (True, False), (False, True)])
def test_attention_shared_upper_layer(meta_bits: int, shared: tuple[bool, bool]) -> None:
    """The upper layer reads its lower partner's codes with its own metadata."""
    past, q = STEPS["chunked"]
    case = case_for((1, 1), meta_bits=meta_bits, shared=shared, past_lens=past, q_lens=q, num_kv_heads=2, num_q_heads=6)
    check_attention(case)
    # Borrowing for real: with the lower pages scrambled the answer changes.
    case.lower_pages = case.lower_pages[torch.randperm(case.lower_pages.shape[0])]
    assert not torch.allclose(attend(case), case.expected_attention(), atol=0.05)


def test_attention_8bit_meta() -> None:
    past, q = STEPS["chunked"]
    check_attention(
        case_for((2, 2), meta_bits=8, past_lens=past, q_lens=q, num_kv_heads=2, num_q_heads=4, dtype=torch.bfloat16)
    )


def test_empty_request_does_not_disturb_others() -> None:
    """A request with no past and no rows changes nothing; padding rows of ``out`` are zeroed."""
    past, q = [2 * B + 3, 0, B + 1], [1, 0, 4]
    with_empty = case_for(past_lens=past, q_lens=q, num_kv_heads=1, num_q_heads=3, seed=3)
    check_attention(with_empty)
    out = torch.full((with_empty.query.shape[0] + 2, *with_empty.query.shape[1:]), float("nan"), dtype=with_empty.dtype)
    args = list(with_empty.attention_args(out))
    args[0] = torch.cat([with_empty.query, with_empty.query[:2]])
    paged_attention_torch(*args)
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
    torch.testing.assert_close(out[:-2], attend(with_empty), rtol=0, atol=0)


def test_dispatch_under_xquant_kernels_torch_uses_torch_path(monkeypatch) -> None:
    monkeypatch.setenv("XQUANT_KERNELS", "torch")
    assert _impl("cpu").name == "torch"
    monkeypatch.delenv("XQUANT_KERNELS")
    assert _impl("cuda").name == "triton"  # picked by name only: nothing runs on a GPU here
    monkeypatch.setenv("XQUANT_KERNELS", "torch")
    case = case_for(num_kv_heads=1, num_q_heads=2)
    out = case.poisoned_out()
    paged_attention(*case.attention_args(out))
    torch.testing.assert_close(out, attend(case), rtol=0, atol=0)


def test_kernels_env_forces_the_torch_path_and_names_itself_when_wrong(monkeypatch) -> None:
    monkeypatch.setenv("XQUANT_KERNELS", "torch")
    assert _impl("cuda").name == "torch"
    monkeypatch.setenv("XQUANT_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="XQUANT_KERNELS='cuda-please'"):
        _impl("cuda")


# ---- store ----------------------------------------------------------------------------------------------------


def check_store(case: KernelCase) -> None:
    expected = case.expected_store()
    store_kv_torch(*case.store_args())
    for got, want, name in zip((case.pages, case.tail_k, case.tail_v), expected, ("pages", "tail_k", "tail_v")):
        assert torch.equal(got, want), f"{name} differs from the reference"


@pytest.mark.parametrize("step", ["decode", "chunked"])
@pytest.mark.parametrize("bits", BITS)
def test_store_bits(step: str, bits: tuple[int, int]) -> None:
    past, q = STEPS[step]
    case = case_for(bits, past_lens=past, q_lens=q, num_kv_heads=2)
    check_store(case)


@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("shared", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_meta_and_sharing(meta_bits: int, shared: tuple[bool, bool], dtype: torch.dtype) -> None:
    past, q = STEPS["chunked"]
    check_store(
        case_for((1, 2), meta_bits=meta_bits, shared=shared, past_lens=past, q_lens=q, num_kv_heads=2, dtype=dtype)
    )


def test_store_decode_completes_block() -> None:
    """Decode rows that complete a block quantize the tail plus the new row; the others only fill the tail."""
    case = case_for(past_lens=[B - 1, 2 * B - 1, 3], q_lens=[1, 1, 1], num_kv_heads=2)
    assert case.plan.full_block_ids.numel() == 2
    check_store(case)


# ---- several steps: store -> attend over a growing history ----------------------------------------------------


@pytest.mark.parametrize(
    "bits,meta_bits,shared,dtype",
    [
        ((2, 2), 16, (False, False), torch.float16),
        ((1, 2), 8, (True, True), torch.bfloat16),
        ((4, 1), 16, (False, True), torch.float16),
    ],
)
def test_multi_step_history(bits, meta_bits, shared, dtype) -> None:
    lq, lower = layer_pair(
        *bits, head_size=64, block=B, v_group=16, meta_bits=meta_bits, k_shared=shared[0], v_shared=shared[1]
    )
    schedule = [[B + 5, 0, 7], [2 * B, B, 9], [1, 1, 1], [1, 0, 1], [1, 1, B], [1, 1, 6]]
    totals = [sum(col) for col in zip(*schedule)]
    sim = CacheSim(
        lq, store_kv, paged_attention, total_lens=totals, num_kv_heads=2, num_q_heads=6, dtype=dtype,
        lower_lq=lower if any(shared) else None,
    )  # fmt: skip
    for q_lens in schedule:
        out, expected = sim.step(q_lens)
        torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])
    assert sim.lens == totals


def test_plan_moves_to_the_device_in_one_buffer_with_every_field_intact() -> None:
    from dataclasses import fields

    plan = case_for(num_kv_heads=2, num_q_heads=4).plan
    moved = plan.to(torch.device("cpu"))
    for f in fields(plan):
        before, after = getattr(plan, f.name), getattr(moved, f.name)
        if isinstance(before, torch.Tensor):
            assert after.dtype == before.dtype and torch.equal(after, before), f.name
        else:
            assert after == before, f.name
    table = plan.block_table.clone()
    assert plan.to(torch.device("cpu"), block_table=table).block_table is table  # vLLM's own device copy, reused

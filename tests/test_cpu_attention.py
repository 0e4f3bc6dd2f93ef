"""The CPU fast path (C++ attention over the packed pages, C++ store) against the reference and the PyTorch path.

Random non-zero histories from ``kernel_cases`` (ragged past lengths, partial blocks, zero-length past,
shuffled block ids, poisoned unused pages and tail rows, NaN-poisoned outputs), then one in-process engine that
serves the bundled SmolLM2 through the fast path by default and through the PyTorch path under
``XQUANT_KERNELS=torch``, with the same prompt log-probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kernel_cases import CacheSim, KernelCase, layer_pair, make_case, ragged_past_lens
from xquant_vllm import kernels
from xquant_vllm.kernels import _impl, _pick, cpu_attention
from xquant_vllm.kernels.cpu_attention import paged_attention_cpu, store_kv_cpu
from xquant_vllm.kernels.torch_ops import paged_attention_torch

TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
BITS = [(1, 1), (2, 2), (4, 4), (2, 1), (1, 4)]


def case_for(
    bits=(2, 2), *, block=16, v_group=16, head_size=64, meta_bits=16, shared=(False, False), steps="chunked", **kw
) -> KernelCase:
    lq, lower = layer_pair(
        *bits, head_size=head_size, block=block, v_group=v_group, meta_bits=meta_bits,
        k_shared=shared[0], v_shared=shared[1],
    )  # fmt: skip
    past, q = steps_for(block)[steps]
    return make_case(lq, past_lens=past, q_lens=q, lower_lq=lower if any(shared) else None, **kw)


def steps_for(B: int) -> dict[str, tuple[list[int], list[int]]]:
    """Decode, chunked prefill (chunks that complete blocks, start mid-block, a request with no rows), and a fresh
    prefill longer than one chunk tile (64 tokens) next to a decode."""
    return {
        "decode": (ragged_past_lens(B), [1] * 5),
        "chunked": (ragged_past_lens(B), [3, 2 * B + 1, 0, B, 5]),
        "prefill+decode": ([0, 2 * B + 3, 0], [70, 1, 0]),
    }


def fast(case: KernelCase) -> torch.Tensor:
    out = case.poisoned_out()
    paged_attention_cpu(*case.attention_args(out))
    return out


def check(case: KernelCase) -> None:
    """Against the reference attention (the ground truth) and the PyTorch path, which follows it."""
    out = fast(case)
    tol = TOL[case.dtype]
    torch.testing.assert_close(out, case.expected_attention(), rtol=tol, atol=tol)
    torch_out = case.poisoned_out()
    paged_attention_torch(*case.attention_args(torch_out))
    torch.testing.assert_close(out, torch_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("steps", ["decode", "chunked", "prefill+decode"])
@pytest.mark.parametrize("bits", BITS)
def test_bits_and_steps(steps: str, bits: tuple[int, int]) -> None:
    check(case_for(bits, steps=steps, num_kv_heads=2, num_q_heads=6, seed=len(steps)))


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_head_sizes_dtypes_gqa(head_size: int, dtype: torch.dtype, gqa: int) -> None:
    check(case_for((2, 1), head_size=head_size, num_kv_heads=2, num_q_heads=2 * gqa, dtype=dtype))


@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("shared", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shared_upper_layer_and_meta_bits(meta_bits: int, shared: tuple[bool, bool], dtype: torch.dtype) -> None:
    """The upper layer reads its lower partner's codes with its own metadata (16- and 8-bit, calibrated)."""
    case = case_for((1, 2), meta_bits=meta_bits, shared=shared, num_kv_heads=2, num_q_heads=6, dtype=dtype)
    check(case)
    case.lower_pages = case.lower_pages[torch.randperm(case.lower_pages.shape[0])]  # borrowing for real
    assert not torch.allclose(fast(case), case.expected_attention(), atol=0.05)


@pytest.mark.parametrize(
    "block,v_group,meta_bits,bits",
    [(32, 32, 16, (2, 1)), (64, 64, 8, (2, 1)), (32, 16, 8, (4, 2)), (128, 64, 16, (1, 1))],
    ids=["xquant", "xquant-max", "small-groups-8bit", "block-128"],
)
def test_preset_shapes(block: int, v_group: int, meta_bits: int, bits: tuple[int, int]) -> None:
    """The presets' blocks and value groups (32/32, 64/64 with 8-bit metadata), and a 128-token block."""
    for steps in ("decode", "chunked"):
        check(case_for(bits, block=block, v_group=v_group, meta_bits=meta_bits, steps=steps, num_kv_heads=3,
                       num_q_heads=9, dtype=torch.bfloat16))  # fmt: skip


def test_padding_rows_are_zeroed_and_empty_requests_change_nothing() -> None:
    case = case_for(num_kv_heads=1, num_q_heads=3, seed=3)
    n = case.query.shape[0]
    out = torch.full((n + 2, *case.query.shape[1:]), float("nan"), dtype=case.dtype)
    args = list(case.attention_args(out))
    args[0] = torch.cat([case.query, case.query[:2]])
    paged_attention_cpu(*args)
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))
    torch.testing.assert_close(out[:n], fast(case), rtol=0, atol=0)


def test_many_requests_run_in_parallel_with_the_same_answer() -> None:
    """Enough work to use every thread (longest-first over threads) gives the single-thread answer exactly."""
    lq, _ = layer_pair(1, 1, block=32, v_group=32)
    case = make_case(lq, past_lens=[7, 300, 33, 64, 0, 129] * 3, q_lens=[1] * 17 + [40], num_kv_heads=3,
                     num_q_heads=9, dtype=torch.bfloat16, seed=5)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = fast(case)
        torch.set_num_threads(max(2, threads))
        torch.testing.assert_close(fast(case), single, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, case.expected_attention(), rtol=2e-2, atol=2e-2)


def test_unsupported_shapes_take_the_pytorch_path() -> None:
    case = case_for((2, 2), v_group=8, num_kv_heads=1, num_q_heads=2)
    assert not cpu_attention.supported(case.lq)
    torch.testing.assert_close(fast(case), case.expected_attention(), rtol=2e-3, atol=2e-3)


def test_bad_input_names_the_field() -> None:
    case = case_for(num_kv_heads=1, num_q_heads=2)
    case.plan.block_table = case.plan.block_table.long()
    with pytest.raises(RuntimeError, match="block_table"):
        fast(case)
    case = case_for(num_kv_heads=1, num_q_heads=2)
    with pytest.raises(RuntimeError, match="key/value/tail/out: dtype"):
        paged_attention_cpu(*case.attention_args(case.poisoned_out().float()))


# ---- store -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", ["decode", "chunked", "prefill+decode"])
@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("shared", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bits,dtype", [((1, 2), torch.bfloat16), ((4, 1), torch.float16), ((2, 2), torch.bfloat16)])
def test_store_is_the_reference_byte_for_byte(steps, meta_bits, shared, bits, dtype) -> None:
    """Pages (codes, metadata, super range, padding) and tails equal the reference quantizer's, every byte."""
    case = case_for(bits, meta_bits=meta_bits, shared=shared, steps=steps, num_kv_heads=2, dtype=dtype, seed=2)
    expected = case.expected_store()
    store_kv_cpu(*case.store_args())
    for got, want, name in zip((case.pages, case.tail_k, case.tail_v), expected, ("pages", "tail_k", "tail_v")):
        assert torch.equal(got, want), f"{name} differs from the reference"


@pytest.mark.parametrize("block,v_group,head_size", [(32, 32, 128), (64, 64, 64), (16, 8, 256)])
def test_store_shapes(block: int, v_group: int, head_size: int) -> None:
    for meta_bits in (16, 8):
        case = case_for((2, 1), block=block, v_group=v_group, head_size=head_size, meta_bits=meta_bits,
                        steps="chunked", num_kv_heads=3)  # fmt: skip
        expected = case.expected_store()
        store_kv_cpu(*case.store_args())
        assert all(torch.equal(g, w) for g, w in zip((case.pages, case.tail_k, case.tail_v), expected))


@pytest.mark.parametrize(
    "bits,meta_bits,shared,dtype",
    [((2, 2), 16, (False, False), torch.float16), ((1, 2), 8, (True, True), torch.bfloat16)],
)
def test_multi_step_history_with_the_store(bits, meta_bits, shared, dtype) -> None:
    B = 16
    lq, lower = layer_pair(*bits, block=B, v_group=16, meta_bits=meta_bits, k_shared=shared[0], v_shared=shared[1])
    schedule = [[B + 5, 0, 7], [2 * B, B, 9], [1, 1, 1], [1, 0, 1], [1, 1, B], [1, 1, 6]]
    sim = CacheSim(
        lq, store_kv_cpu, paged_attention_cpu, total_lens=[sum(c) for c in zip(*schedule)], num_kv_heads=2,
        num_q_heads=6, dtype=dtype, lower_lq=lower if any(shared) else None,
    )  # fmt: skip
    for q_lens in schedule:
        out, expected = sim.step(q_lens)
        torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])


# ---- dispatch --------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_pick() -> Iterator[None]:
    _pick.cache_clear()
    yield
    _pick.cache_clear()


def test_cpu_dispatch_picks_the_fast_path_and_torch_on_request(monkeypatch, fresh_pick) -> None:
    assert _impl("cpu").name == "cpu"
    monkeypatch.setenv("XQUANT_KERNELS", "torch")
    assert _impl("cpu").name == "torch"
    monkeypatch.setenv("XQUANT_KERNELS", "cpu")
    assert _impl("cpu").name == "cpu"
    case = case_for(num_kv_heads=1, num_q_heads=2)
    out = case.poisoned_out()
    kernels.paged_attention(*case.attention_args(out))
    torch.testing.assert_close(out, fast(case), rtol=0, atol=0)


def test_a_failed_build_falls_back_with_one_log_line(monkeypatch, fresh_pick, caplog) -> None:
    def broken():
        raise OSError("g++: command not found")

    monkeypatch.setattr(cpu_attention, "load_extension", broken)
    with caplog.at_level(logging.INFO, logger="xquant_vllm.kernels"):
        assert _impl("cpu").name == "torch"
        assert _impl("cpu").name == "torch"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "g++: command not found" in warnings[0].getMessage()
    monkeypatch.setenv("XQUANT_KERNELS", "cpu")
    with pytest.raises(RuntimeError, match="XQUANT_KERNELS=cpu"):
        _impl("cpu")


# ---- the engine ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_engine(smollm2_dir: Path):
    """One in-process SmolLM2 engine with the xquant cache; 64-token chunks so later chunks read the pages."""
    vllm = pytest.importorskip("vllm")
    import vllm.envs as envs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.delenv("XQUANT_KERNELS", raising=False)
        envs.disable_envs_cache()
        _pick.cache_clear()
        llm = vllm.LLM(str(smollm2_dir), kv_cache_dtype="xquant", enforce_eager=True, max_model_len=1024,
                       max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False)  # fmt: skip
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            envs.disable_envs_cache()
            _pick.cache_clear()


def prompt_logprobs(llm, prompts: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    """Log-probabilities of every prompt token after the first, and 8 greedy tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    lps = [[lp[t].logprob for t, lp in zip(p[1:], o.prompt_logprobs[1:])] for p, o in zip(prompts, outs)]
    return torch.tensor(lps), [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.engine
@pytest.mark.model
def test_engine_uses_the_fast_path_with_the_reference_logprobs(cpu_engine, essays, monkeypatch) -> None:
    """Two essays of 300 tokens in 64-token chunks (each chunk reads the earlier ones from 1- and 2-bit pages,
    shared layers included), teacher-forced: the fast path's NLL is the PyTorch path's within 0.1 nats per prompt
    (measured 0.03-0.08: bf16 rounding differences, amplified where 1-bit codes flip; the README's noise between
    two valid attention implementations is 0.08), and within 0.1 nats per token on average over the first chunk,
    which reads no pages (measured 0.04)."""
    tok = cpu_engine.get_tokenizer()
    prompts = [tok(e.text).input_ids[:300] for e in essays[:2]]
    fast_lp, fast_tokens = prompt_logprobs(cpu_engine, prompts)
    assert _pick.cache_info().currsize == 1 and _impl("cpu").name == "cpu", "the CPU engine must use the fast path"
    monkeypatch.setenv("XQUANT_KERNELS", "torch")
    torch_lp, torch_tokens = prompt_logprobs(cpu_engine, prompts)
    assert _impl("cpu").name == "torch"
    nll_gap = (fast_lp.mean(1) - torch_lp.mean(1)).abs()
    first_chunk_gap = (fast_lp[:, :62] - torch_lp[:, :62]).abs().mean()
    assert nll_gap.max() < 0.1 and first_chunk_gap < 0.1, (nll_gap, first_chunk_gap)
    assert [t[0] for t in fast_tokens] == [t[0] for t in torch_tokens]

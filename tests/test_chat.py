"""Chat answers of the default preset through the engine must state the facts that the bf16 model states.

Teacher-forced NLL can hide a cache that writes gibberish once the first block is quantized; three greedy chat
answers cannot. The chat template's system turn puts every prompt past the first 32-token block, and the answer
is generated from quantized pages.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from xquant_vllm.config import DEFAULT_PRESET

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chat_quality  # noqa: E402

FACTS = {  # prompt -> the word its answer must contain (the bf16 cache's and kivi-2's greedy answers do)
    "What is the capital of France?": "Paris",
    "Which planet is known as the Red Planet?": "Mars",
    "Who wrote the play Romeo and Juliet?": "Shakespeare",
}


def test_exact_match_is_a_whole_word_any_case() -> None:
    assert chat_quality.matches("The capital of France is paris.", ("Paris",))
    assert chat_quality.matches("A week has 7 days.", ("seven", "7"))
    assert not chat_quality.matches("Parisian food", ("Paris",))
    assert not chat_quality.matches("17 days", ("seven", "7"))


def test_benchmark_prompts() -> None:
    kinds = [p.kind for p in chat_quality.PROMPTS]
    assert len(kinds) == 20 and set(kinds) == {"fact", "arithmetic", "story", "list"}
    assert all(bool(p.answers) == (p.kind in ("fact", "arithmetic")) for p in chat_quality.PROMPTS)
    assert chat_quality.PROMPTS[chat_quality.SAMPLE].kind == "story"
    assert set(FACTS.items()) <= {(p.text, p.answers[0]) for p in chat_quality.PROMPTS if p.answers}


@pytest.mark.engine
@pytest.mark.model
@pytest.mark.parametrize("kv_cache_dtype", dict.fromkeys(["auto", DEFAULT_PRESET]))  # auto: the prompts' control
def test_default_preset_answers_state_the_facts(smollm2_dir: Path, vllm_engine, kv_cache_dtype: str) -> None:
    from vllm import SamplingParams

    with vllm_engine(smollm2_dir, kv_cache_dtype=kv_cache_dtype, max_model_len=256, max_num_seqs=len(FACTS)) as llm:
        messages = [[{"role": "user", "content": q}] for q in FACTS]
        outs = llm.chat(messages, SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    assert min(len(o.prompt_token_ids) for o in outs) > 32
    answers = {q: o.outputs[0].text for q, o in zip(FACTS, outs)}
    missing = {q: a for q, a in answers.items() if not re.search(rf"\b{FACTS[q]}\b", a, re.IGNORECASE)}
    assert not missing, f"{kv_cache_dtype} answers without the fact: {missing}"

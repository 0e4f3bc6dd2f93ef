"""The second bundled model, Qwen2.5-Coder-0.5B-Instruct: its checkpoint, a sensible answer, vLLM serving it.

Few and small on purpose: the first run downloads 491 MB (cached after) and every engine start costs CI time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from xquant_vllm import bundled

pytestmark = pytest.mark.model

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_checkpoint_is_qwen2_with_biases_and_its_own_head(qwen_dir: Path) -> None:
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (24, 14, 2)
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]  # as vLLM does
    assert head_size == 64
    assert config["tie_word_embeddings"] is False and "quantization_config" not in config
    assert json.loads((qwen_dir / bundled.MARKER).read_text())["model"] == "qwen2.5-coder-0.5b"
    with safe_open(qwen_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert len(names) == 24 * 12 + 3  # 12 per layer (q/k/v biases included), embedding, final norm, head
    assert {f"model.layers.23.self_attn.{p}_proj.bias" for p in "qkv"} <= names and "lm_head.weight" in names


def test_greedy_answers_paris(qwen_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=torch.bfloat16)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])
    assert tokenizer.eos_token == "<|im_end|>"  # the chat turn's end: generation stops there


@pytest.mark.engine
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "kivi-2"])
def test_vllm_serves_it(qwen_dir: Path, vllm_engine, kv_cache_dtype: str) -> None:
    """The chat prompt (system turn included) is over 32 tokens, so the answer reads quantized blocks."""
    from vllm import SamplingParams

    with vllm_engine(qwen_dir, kv_cache_dtype=kv_cache_dtype, max_model_len=256, max_num_seqs=2) as llm:
        out = llm.chat([CHAT], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 32
    assert "Paris" in out.outputs[0].text

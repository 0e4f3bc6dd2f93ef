"""Shared fixtures: the bundled checkpoints, the essay corpus, tiny random Llama checkpoints, in-process engines.

The bundled assets live in the user cache (``$XQUANT_CACHE`` or ``~/.cache/xquant-vllm``) and are built once
per machine, not per test run. Tiny models are random weights with SmolLM2's tokenizer, so that anything that
loads a checkpoint (transformers, vLLM) can run on a shape of the test's choosing without a model hub.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from xquant_vllm.bundled import ensure_model
from xquant_vllm.essays import Essay, load_essays
from xquant_vllm.models import QWEN25_CODER

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled bf16 SmolLM2-135M-Instruct checkpoint (built on first use, about half a minute)."""
    return ensure_model()


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """The bf16 Qwen2.5-Coder-0.5B-Instruct checkpoint (built on first use: a 491 MB download, about two minutes)."""
    return ensure_model(model=QWEN25_CODER.name)


@pytest.fixture(scope="session")
def vllm_engine() -> Callable[..., Any]:
    """``with vllm_engine(model_dir, kv_gib=1, **llm_kwargs) as llm``: an in-process vLLM engine (no spawned
    engine core or worker, so it starts in seconds), shut down and its environment cache reset afterwards."""
    pytest.importorskip("vllm")

    @contextmanager
    def engine(model: Path, kv_gib: int = 1, **kwargs: Any) -> Iterator[Any]:
        import vllm.envs as envs
        from vllm import LLM

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            mp.setenv("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
            envs.disable_envs_cache()  # a previous engine froze the environment
            llm = LLM(str(model), enforce_eager=True, **{"max_model_len": 1024, **kwargs})
            try:
                yield llm
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
                envs.disable_envs_cache()

    return engine


@pytest.fixture(scope="session")
def essays() -> list[Essay]:
    """The 49 Paul Graham essays, sorted by name."""
    return load_essays()


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Callable[..., Path]:
    """``make(num_layers=4, num_kv_heads=2, head_size=64, num_heads=4, intermediate=256, dtype="bfloat16")``:
    a random LlamaForCausalLM checkpoint folder with SmolLM2's tokenizer; one folder per shape per session."""
    made: dict[tuple, Path] = {}

    def make(num_layers: int = 4, num_kv_heads: int = 2, head_size: int = 64, num_heads: int = 4,
             intermediate: int = 256, dtype: str = "bfloat16") -> Path:
        key = (num_layers, num_kv_heads, head_size, num_heads, intermediate, dtype)
        if key in made:
            return made[key]
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        folder = tmp_path_factory.mktemp("tiny-llama-" + "-".join(map(str, key)))
        config = LlamaConfig(
            vocab_size=49152,  # SmolLM2's tokenizer
            hidden_size=num_heads * head_size,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_size,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            shutil.copy(smollm2_dir / name, folder / name)
        made[key] = folder
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama_factory: Callable[..., Path]) -> Path:
    """A 4-layer random Llama (2 KV heads, head size 64, bf16) with SmolLM2's tokenizer."""
    return tiny_llama_factory()

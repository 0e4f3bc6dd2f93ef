"""Merge the GPU runs' JSON (``benchmarks/results/gpu/``) into one summary, its plots and the README's tables.

    python benchmarks/gpu/report.py            # writes benchmarks/results/gpu_e2e.{json,md} and gpu_*.png
    python benchmarks/gpu/report.py --throughput-only benchmarks/results/gpu_h200   # -> gpu_h200.md

No GPU needed: it reads what ``benchmarks/gpu/run.py`` wrote on the GPU machine (the calls that produced each
file are in ``benchmarks/results/gpu/commands.txt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
RAW = RESULTS / "gpu"
ORDER = ("auto", "fp8", "int4_per_token_head", "turboquant_k3v4_nc", "turboquant_3bit_nc", "kivi-4", "kivi-2",
         "asymkv-1.5", "xquant-paper", "xquant", "xquant-1.25", "xquant-max")  # fmt: skip
SHAPES = {"llama3-8b": (32, 8, 128), "SmolLM2-135M-Instruct": (30, 3, 64)}  # layers, KV heads, head size


def load(name: str) -> dict[str, Any]:
    return json.loads((RAW / name).read_text())


def rows_of(*names: str) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for name in names:  # a later file's failed row never hides an earlier file's good one
        for dtype, row in load(name)["rows"].items():
            if row.get("ok") or dtype not in merged:
                merged[dtype] = row
    return {k: merged[k] for k in ORDER if k in merged}


def capacity(model: str, files: tuple[str, ...]) -> dict[str, Any]:
    """Tokens and concurrency per dtype at one KV budget, with the bits per element that budget implies."""
    meta = load(files[0])
    budgets = {load(f)["kv_cache_memory_bytes"] for f in files}
    if len(budgets) != 1:
        raise ValueError(f"{model}: the capacity files {files} were measured at different KV budgets {budgets}")
    budget = budgets.pop()
    layers, heads, dim = SHAPES[model]
    rows, auto, fp8 = {}, None, None
    for dtype, r in rows_of(*files).items():
        if not r.get("ok"):
            rows[dtype] = {"error": r.get("error")}
            continue
        tokens = r["kv_cache_tokens"]
        auto = tokens if dtype == "auto" else auto
        fp8 = tokens if dtype == "fp8" else fp8
        rows[dtype] = {"kv_cache_tokens": tokens, "max_concurrency": r["max_concurrency"],
                       "bits_per_element": budget * 8 / (tokens * layers * 2 * heads * dim)}  # fmt: skip
    for r in rows.values():
        if "kv_cache_tokens" in r:
            r["x_auto"], r["x_fp8"] = r["kv_cache_tokens"] / auto, r["kv_cache_tokens"] / fp8
    return {"model": model, "kv_cache_memory_bytes": budget, "max_model_len": meta["max_model_len"],
            "gpu_memory_utilization": meta["gpu_memory_utilization"], "rows": rows}  # fmt: skip


def quality(cap: dict[str, Any]) -> dict[str, Any]:
    meta = load("quality-peers.json")
    rows = {}
    for dtype, r in rows_of("quality-peers.json", "quality-ours.json").items():
        c = cap["rows"].get(dtype, {})
        rows[dtype] = {"nll": r["nll"], "bits_per_element": c.get("bits_per_element"), "x_auto": c.get("x_auto")}
    return {"windows": meta["windows"], "context": meta["context"], "continuation": meta["continuation"],
            "chunk": meta["chunk"], "rows": rows}  # fmt: skip


WORKLOAD = ("requests", "mix", "prompt_len", "output_len", "kv_cache_memory_bytes", "max_num_seqs", "enforce_eager")


def throughput(path: Path, reference: Path | None = None) -> dict[str, Any]:
    """One run's rows; ``vs auto``/``vs fp8`` against ``reference`` (another run of the same workload) where this
    run has no such row."""
    data = json.loads(path.read_text())
    rows = {k: r for k, r in data["rows"].items() if r.get("ok")}
    ref = {k: r for k, r in json.loads(reference.read_text())["rows"].items() if r.get("ok")} if reference else {}
    auto = (rows.get("auto") or ref.get("auto") or {}).get("output_tokens_per_s")
    fp8 = (rows.get("fp8") or ref.get("fp8") or {}).get("output_tokens_per_s")
    out = {}
    for dtype in (d for d in ORDER if d in rows):
        r = rows[dtype]
        out[dtype] = {k: r[k] for k in ("output_tokens_per_s", "requests_per_s", "total_tokens_per_s", "batch_mean",
                                        "batch_max", "preemptions", "kv_cache_tokens", "seconds_total")}  # fmt: skip
        out[dtype]["cudagraph_mode"] = r.get("cudagraph_mode")
        out[dtype]["triton_compiles_timed"] = r.get("triton_compiles_timed")  # None: not counted (older runs)
        out[dtype]["x_auto"] = r["output_tokens_per_s"] / auto if auto else None
        out[dtype]["x_fp8"] = r["output_tokens_per_s"] / fp8 if fp8 else None
    borrowed = [d for d in ("auto", "fp8") if d not in rows and d in ref]
    return {**{k: data[k] for k in WORKLOAD}, "warmup_requests": data.get("warmup_requests"), "rows": out,
            "reference": {"file": reference.name, "dtypes": borrowed} if borrowed else None}  # fmt: skip


def profile() -> dict[str, Any]:
    rows = {}
    for dtype, r in load("profile-llama3-8b.json")["rows"].items():
        d = r["decode"]
        rows[dtype] = {"batch": d["batch"], "wall_ms_per_step": d["wall_ms_per_step"], "gpu_ms_per_step": d["gpu_ms_per_step"],
                       "host_ms_per_step": d["wall_ms_per_step"] - d["gpu_ms_per_step"],
                       "gpu_ms_by_kind": d["ms_per_step_by_kind"]}  # fmt: skip
    return {"phase": "decode (prefill part of that run hit the prefix cache: not used)", "rows": rows}


def summarize() -> dict[str, Any]:
    cap8 = capacity("llama3-8b", ("capacity-llama3-8b-peers.json", "capacity-llama3-8b-ours.json"))
    cap_s = capacity("SmolLM2-135M-Instruct", ("capacity-smollm2-peers.json", "capacity-smollm2-rest.json"))
    smoke = load("smoke.json")
    return {
        "device": load("capacity-llama3-8b-peers.json")["device"],
        "capacity_llama3_8b": cap8,
        "capacity_smollm2": cap_s,
        "quality_smollm2": quality(cap_s),
        "throughput": {"fixed_graphs": throughput(RAW / "throughput-llama3-8b-fixed-graphs.json"),
                       "fixed_eager": throughput(RAW / "throughput-llama3-8b-fixed-eager.json"),
                       "long_eager": throughput(RAW / "throughput-llama3-8b-long-eager.json")},  # fmt: skip
        "profile_decode": profile(),
        "smoke": {"presets_ok": {k: r["ok"] for k, r in smoke["rows"].items()}, "triton_vs_torch": smoke["agreement"]},
    }


def plot(s: dict[str, Any]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key in zip(axes, ("capacity_llama3_8b", "capacity_smollm2")):
        cap = s[key]
        names = [d for d, r in cap["rows"].items() if "x_auto" in r]
        vals = [cap["rows"][d]["x_auto"] for d in names]
        colors = ["#4c72b0" if d in ("auto", "fp8") or "_" in d else "#dd8452" for d in names]
        ax.barh(names, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("KV cache tokens vs auto (same KV memory)")
        ax.set_title(f"{cap['model']}: {cap['kv_cache_memory_bytes'] / 2**30:.1f} GiB of KV cache")
    fig.suptitle(f"vLLM's logged KV cache size on {s['device'].get('gpu')} (blue: vLLM's own, orange: ours)")
    fig.tight_layout()
    fig.savefig(RESULTS / "gpu_capacity.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 4.8))
    for d, r in s["quality_smollm2"]["rows"].items():
        ours = d not in ("auto", "fp8") and "_" not in d
        ax.scatter(r["bits_per_element"], r["nll"], color="#dd8452" if ours else "#4c72b0")
        ax.annotate(d, (r["bits_per_element"], r["nll"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per cached element (KV memory / tokens vLLM fits)")
    ax.set_ylabel("teacher-forced NLL (nats/token)")
    ax.set_title("SmolLM2 through vLLM on the GPU: cost against quality")
    fig.tight_layout()
    fig.savefig(RESULTS / "gpu_quality.png", dpi=110)

    runs = s["throughput"]
    fig, axes = plt.subplots(1, len(runs), figsize=(14, 4.4))
    titles = {"fixed_graphs": "2048+256 tokens, vLLM graphs", "fixed_eager": "2048+256 tokens, eager",
              "long_eager": "4k-12k prompts + 256, eager"}  # fmt: skip
    for ax, (key, run) in zip(axes, runs.items()):
        names = list(run["rows"])
        vals = [run["rows"][d]["output_tokens_per_s"] for d in names]
        ax.bar(names, vals, color=["#dd8452" if d.startswith("xquant") else "#4c72b0" for d in names])
        for x, d in enumerate(names):
            ax.text(x, vals[x], f"batch {run['rows'][d]['batch_mean']:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{titles[key]} ({run['requests']} requests)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylabel("output tokens/s")
    fig.suptitle("Llama-3-8B shape (dummy weights), 12 GiB of KV cache, max_num_seqs 256")
    fig.tight_layout()
    fig.savefig(RESULTS / "gpu_throughput.png", dpi=110)

    prof = s["profile_decode"]["rows"]
    colors = {"GEMM (linear layers)": "#4c72b0", "vLLM attention": "#55a868", "xquant attention": "#dd8452",
              "xquant store": "#c44e52", "other": "#8172b3", "host": "#cccccc"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labelled: set[str] = set()
    for y, r in enumerate(prof.values()):
        left = 0.0
        for kind, width in [*r["gpu_ms_by_kind"].items(), ("host", r["host_ms_per_step"])]:
            label = None if kind in labelled else ("host (no GPU kernel running)" if kind == "host" else kind)
            labelled.add(kind)
            ax.barh(y, width, left=left, color=colors.get(kind, "#937860"), label=label)
            left += width
    ax.set_yticks(range(len(prof)), list(prof))
    ax.set_xlabel("ms per decode step (batch 64, 2k context, eager, under torch.profiler)")
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.75))
    fig.tight_layout()
    fig.savefig(RESULTS / "gpu_profile.png", dpi=110)


def tables(s: dict[str, Any]) -> str:
    lines = []
    c8, cs = s["capacity_llama3_8b"], s["capacity_smollm2"]
    lines += ["| kv_cache_dtype | Llama-3-8B shape: tokens | vs auto | vs fp8 | max concurrency (8k) | SmolLM2: tokens | vs auto | bits/element |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for d in ORDER:
        a, b = c8["rows"].get(d, {}), cs["rows"].get(d, {})
        if "kv_cache_tokens" not in a:
            continue
        lines.append(f"| `{d}` | {a['kv_cache_tokens']:,} | {a['x_auto']:.2f}x | {a['x_fp8']:.2f}x | {a['max_concurrency']:.1f} | "
                     f"{b['kv_cache_tokens']:,} | {b['x_auto']:.2f}x | {b['bits_per_element']:.2f} |")  # fmt: skip
    lines += ["", "| kv_cache_dtype | bits/element | tokens vs auto | NLL (SmolLM2, 20 windows) |", "| --- | ---: | ---: | ---: |"]
    for d, r in s["quality_smollm2"]["rows"].items():
        lines.append(f"| `{d}` | {r['bits_per_element']:.2f} | {r['x_auto']:.2f}x | {r['nll']:.3f} |")
    for key, run in s["throughput"].items():
        lines += throughput_table(key, run)
    return "\n".join(lines) + "\n"


def throughput_table(key: str, run: dict[str, Any]) -> list[str]:
    warm = run.get("warmup_requests")
    warm_text = f"untimed warm-up of {warm} requests of the same lengths first" if warm else "only a tiny warm-up (4 x 512 tokens + 8): JIT compiles may fall inside the timed run"
    lines = ["", f"Throughput `{key}`: {run['requests']} requests, {run['mix']}, eager={run['enforce_eager']}, {warm_text}", "",
             "| kv_cache_dtype | output tok/s | req/s | vs auto | vs fp8 | batch mean / max | preemptions | graphs | Triton compiles timed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    if run.get("reference"):
        ref = run["reference"]
        lines.insert(2, f"(no {'/'.join(ref['dtypes'])} row in this run: vs {'/'.join(ref['dtypes'])} against `{ref['file']}`, "
                        "another run of the same workload)")  # fmt: skip
    for d, r in run["rows"].items():
        xa = f"{r['x_auto']:.2f}x" if r["x_auto"] else "-"
        xf = f"{r['x_fp8']:.2f}x" if r["x_fp8"] else "-"
        mode = (r.get("cudagraph_mode") or "-").removeprefix("CUDAGraphMode.")
        jit = "-" if r.get("triton_compiles_timed") is None else r["triton_compiles_timed"]
        lines.append(f"| `{d}` | {r['output_tokens_per_s']:,.0f} | {r['requests_per_s']:.2f} | {xa} | {xf} | "
                     f"{r['batch_mean']:.0f} / {r['batch_max']} | {r['preemptions']:.0f} | {mode} | {jit} |")  # fmt: skip
    return lines


def throughput_only(folder: Path) -> str:
    """The tables of every throughput JSON in ``folder``: a run with no capacity or quality suites (the H200's)."""
    lines = []
    paths = sorted(folder.glob("throughput-*.json"))
    for path in paths:
        data = json.loads(path.read_text())
        have = {k for k, r in data["rows"].items() if r.get("ok")}
        reference = None
        if not {"auto", "fp8"} <= have:  # another run of the same workload that has them
            same = [q for q in paths if q != path and all(json.loads(q.read_text()).get(k) == data.get(k) for k in WORKLOAD)]
            same = [q for q in same if {"auto", "fp8"} & {k for k, r in json.loads(q.read_text())["rows"].items() if r.get("ok")}]
            def rank(q: Path) -> tuple[int, int]:  # the most of auto/fp8, then a warmed-up run
                d = json.loads(q.read_text())
                return len({"auto", "fp8"} & {k for k, r in d["rows"].items() if r.get("ok")}), d.get("warmup_requests") or 0

            reference = max(same, key=rank) if same else None
        lines += throughput_table(path.stem, throughput(path, reference))
    return "\n".join(lines) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["--throughput-only"]:  # e.g. --throughput-only benchmarks/results/gpu_h200
        folder = Path(sys.argv[2])
        text = throughput_only(folder)
        (folder.parent / f"{folder.name}.md").write_text(text)
        print(text)
        return 0
    s = summarize()
    (RESULTS / "gpu_e2e.json").write_text(json.dumps(s, indent=1) + "\n")
    (RESULTS / "gpu_e2e.md").write_text(tables(s))
    plot(s)
    print(tables(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())

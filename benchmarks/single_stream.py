"""Single-stream speed on the CPU: one request, a ~1,000-token prompt, 128 greedy output tokens, per KV cache.

Every configuration gets its own vLLM engine (default settings, prefix caching off so every round prefills),
all started first; then the rounds run interleaved (auto, xquant, xquant on the PyTorch path, auto, ...) so
that the machine's load, shared with whatever else runs, falls on all of them alike. Each round uses a different
essay as the prompt. Per request: time to first token, decode tok/s (tokens after the first over the time after
it) and end-to-end tok/s (all output tokens over the whole request). The load average is recorded around each
request. Writes ``benchmarks/results/single_stream.{json,png,cmd.txt}``.

    python benchmarks/single_stream.py                       # auto, xquant, xquant (torch path); 3 rounds
    python benchmarks/single_stream.py --configs auto,xquant --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# name -> (kv_cache_dtype, XQUANT_KERNELS for the engine; None: the default dispatch)
CONFIGS = {"auto": ("auto", None), "xquant": ("xquant", None), "xquant-torch": ("xquant", "torch")}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_engine(model: str, dtype: str, kernels: str | None, args: argparse.Namespace):
    """An engine whose core process sees ``XQUANT_KERNELS=kernels`` (the variable is read there, per call)."""
    import vllm.envs as envs
    from vllm import LLM

    saved = os.environ.get("XQUANT_KERNELS")
    if kernels is None:
        os.environ.pop("XQUANT_KERNELS", None)
    else:
        os.environ["XQUANT_KERNELS"] = kernels
    try:
        envs.disable_envs_cache()
        return LLM(model, kv_cache_dtype=dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   enable_prefix_caching=False, seed=0)  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop("XQUANT_KERNELS", None)
        else:
            os.environ["XQUANT_KERNELS"] = saved


def one_request(llm, prompt: list[int], max_tokens: int, request_id: str) -> dict:
    """Step the engine by hand: the first step that returns a token marks the time to first token."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    load_before = load_average()
    start = time.perf_counter()
    engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    first = None
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = len(out.outputs[0].token_ids)
            if first is None and tokens:
                first = time.perf_counter()
    end = time.perf_counter()
    return {
        "prompt_tokens": len(prompt),
        "output_tokens": tokens,
        "ttft_s": round(first - start, 4),
        "decode_tok_s": (tokens - 1) / (end - first),
        "e2e_tok_s": tokens / (end - start),
        "total_s": round(end - start, 3),
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
    }


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("decode_tok_s", "e2e_tok_s", "ttft_s"):
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "e2e_tok_s", "end-to-end tok/s")):
        med = [record["summary"][n][key]["median"] for n in names]
        err = [[m - record["summary"][n][key]["min"] for n, m in zip(names, med)],
               [record["summary"][n][key]["max"] - m for n, m in zip(names, med)]]  # fmt: skip
        ax.bar(names, med, yerr=err, capsize=4, color=["tab:gray", "tab:blue", "tab:orange"][: len(names)])
        for i, m in enumerate(med):
            ax.text(i, m, f"{m:.1f}\n{m / med[0]:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, max(med) * 1.3)
    s = record["settings"]
    fig.suptitle(f"One request on the CPU: {s['prompt_tokens']}-token prompt, {s['max_tokens']} output tokens "
                 f"(median of {s['rounds']} interleaved rounds, min-max bars)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled SmolLM2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prompt tokens (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens (default 128)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length (default 2048)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="engine batch limit (default 16)")
    parser.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of each engine (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "single_stream", help="output prefix")
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")

    from xquant_vllm.bundled import ensure_model
    from xquant_vllm.essays import load_essays

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    model = args.model or str(ensure_model())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    essays = load_essays()
    prompts = [tokenizer(e.text).input_ids[: args.prompt_tokens] for e in essays[: args.rounds + 1]]
    engines = {name: start_engine(model, *CONFIGS[name], args) for name in names}
    for name, llm in engines.items():  # warm-up: first-step compilation and allocation
        one_request(llm, prompts[-1][:64], 8, f"warmup-{name}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name, llm in engines.items():
            result = one_request(llm, prompts[r], args.max_tokens, f"{name}-{r}")
            runs[name].append({"round": r, **result})
            print(f"round {r} {name}: decode {result['decode_tok_s']:.1f} tok/s, e2e {result['e2e_tok_s']:.1f} tok/s, "
                  f"TTFT {result['ttft_s']:.2f} s, load {result['load_avg_before']}", flush=True)  # fmt: skip
    summary = {name: summarize(rs) for name, rs in runs.items()}
    base = summary[names[0]]
    for name in names:
        for key in ("decode_tok_s", "e2e_tok_s"):
            summary[name][f"{key}_vs_{names[0]}"] = summary[name][key]["median"] / base[key]["median"]
    command = "python benchmarks/single_stream.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"command": command, "settings": settings, "configs": {n: CONFIGS[n] for n in names},
              "cpu_count": os.cpu_count(), "summary": summary, "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    Path(f"{args.out}.cmd.txt").write_text(command + "\n")
    plot(record, Path(f"{args.out}.png"))
    for name in names:
        s = summary[name]
        print(f"{name}: decode {s['decode_tok_s']['median']:.1f} tok/s ({s[f'decode_tok_s_vs_{names[0]}']:.2f}x), "
              f"e2e {s['e2e_tok_s']['median']:.1f} tok/s ({s[f'e2e_tok_s_vs_{names[0]}']:.2f}x)")  # fmt: skip
    print(f"wrote {args.out}.json, {args.out}.png, {args.out}.cmd.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

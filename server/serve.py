"""Run vLLM's ``vllm serve`` (its parser, FastAPI app, engine client and shutdown) with this package's defaults.

What changes against a plain ``vllm serve``: MODEL defaults to the bundled SmolLM2 and takes bundled model names
(``smollm2``, ...); ``--kv-cache-dtype`` defaults to ``xquant``; the context, batch and queue have stated
defaults; on CPU the KV cache gets 2 GiB unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise; SIGTERM drains; and
:class:`xquant_vllm.server.middleware.XQuantServerEdges` joins vLLM's ``--middleware`` list. The ``xquant_kv_*``
series come from the plugin, as in any vLLM server.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from xquant_vllm import vllm_compat

MIDDLEWARE = "xquant_vllm.server.middleware.XQuantServerEdges"
CPU_DEFAULT_KV_BYTES = 2 << 30  # vLLM's CPU worker would otherwise refuse to start without VLLM_CPU_KVCACHE_SPACE
DEFAULTS = {"kv_cache_dtype": "xquant", "max_model_len": 2048, "max_num_seqs": 32, "shutdown_timeout": 60}
QUEUE_PER_SEQ = 4  # --max-num-queued-reqs defaults to this many requests per running sequence
DESCRIPTION = (
    "vLLM's OpenAI-compatible server (the options of `vllm serve`, all of them), with these defaults: MODEL is the "
    "bundled SmolLM2-135M-Instruct (or a bundled model's name: {models}), --kv-cache-dtype xquant, "
    "--max-model-len 2048, --max-num-seqs 32, --max-num-queued-reqs 4 x --max-num-seqs (then 429 with "
    "Retry-After), --shutdown-timeout 60 (SIGTERM lets running requests finish), and on CPU "
    "--kv-cache-memory-bytes 2GiB unless VLLM_CPU_KVCACHE_SPACE is set. /metrics has vLLM's vllm:* series and the "
    "plugin's xquant_kv_* ones. Preset overrides: XQUANT_CONFIG."
)


def byte_size(text: str) -> int:
    """vLLM's sizes (``2G`` = 2^30, ``2g`` = 10^9, ``2147483648``) and ``2GiB``/``256MiB`` spelled out."""
    from vllm.utils.argparse_utils import human_readable_int

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])iB\s*", text)
    if match is None:
        return human_readable_int(text)
    return int(float(match.group(1)) * 2 ** (10 + 10 * "KMGT".index(match.group(2))))


def build_parser() -> argparse.ArgumentParser:
    """vLLM's ``serve`` parser under ``xquant-vllm``, with our group and defaults."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from xquant_vllm.models import MODELS

    top = FlexibleArgumentParser(prog="xquant-vllm")
    parser = vllm_compat.serve_subcommand().subparser_init(top.add_subparsers(dest="subparser"))
    parser.usage = "xquant-vllm serve [MODEL] [OPTIONS]"
    parser.description = DESCRIPTION.format(models=", ".join(MODELS))
    parser.epilog = (parser.epilog or "").replace("vllm serve", "xquant-vllm serve")
    group = parser.add_argument_group("xquant-vllm", "Options xquant-vllm serve adds to vLLM's")
    group.add_argument(
        "--max-request-body-bytes", type=byte_size, default=8 << 20,
        help="largest request body accepted; larger ones get 413 before they are read (default 8MiB)",
    )
    if not vllm_compat.engine_queue_limit():
        group.add_argument(
            "--max-num-queued-reqs", type=int, default=None,
            help="requests admitted at once, running and waiting; past it 429 with Retry-After "
            "(default 4 x --max-num-seqs)",
        )
    for action in parser._actions:
        if action.dest == "kv_cache_memory_bytes":
            action.type = byte_size
    parser.set_defaults(**DEFAULTS)
    return top


def apply_defaults(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Defaults that depend on other options: the model, its served name, the queue, CPU memory, middleware.

    Returns what was chosen and why, for the start-up line (the bits and capacity follow from the plugin and the
    ``xquant_kv_*`` stat logger once the engine has sized its cache)."""
    from vllm.platforms import current_platform

    from xquant_vllm.bundled import model_path
    from xquant_vllm.models import DEFAULT_MODEL, MODELS, get_model
    from xquant_vllm.plugin import ENV_OVERRIDES

    given = {arg.split("=")[0].replace("_", "-") for arg in argv if arg.startswith("--")}
    chosen = []
    named = args.model_tag or (args.model if args.model != vllm_default_model() else None)
    name = named or DEFAULT_MODEL
    if name in MODELS:
        args.model_tag = args.model = str(model_path(name))
        args.served_model_name = args.served_model_name or [get_model(name).served_name]
        chosen.append(f"model {name} ({'bundled, named' if named else 'the default: no MODEL given'})")
    overrides = os.environ.get(ENV_OVERRIDES)
    chosen.append(f"--kv-cache-dtype {args.kv_cache_dtype} ("
                  + ("given" if "--kv-cache-dtype" in given else "the default")
                  + (f", {ENV_OVERRIDES} overrides {overrides}" if overrides else f", {ENV_OVERRIDES} unset") + ")")
    if args.max_num_queued_reqs is None:
        args.max_num_queued_reqs = QUEUE_PER_SEQ * args.max_num_seqs
        chosen.append(f"--max-num-queued-reqs {args.max_num_queued_reqs} ({QUEUE_PER_SEQ} x --max-num-seqs)")
    if current_platform.is_cpu() and args.kv_cache_memory_bytes is None and not os.environ.get(
            "VLLM_CPU_KVCACHE_SPACE"):
        args.kv_cache_memory_bytes = CPU_DEFAULT_KV_BYTES
        chosen.append(f"--kv-cache-memory-bytes {CPU_DEFAULT_KV_BYTES >> 30}GiB (CPU, VLLM_CPU_KVCACHE_SPACE unset)")
    args.middleware = [*args.middleware, MIDDLEWARE]
    return chosen


def vllm_default_model() -> str:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs.model


def serve(argv: list[str]) -> int:
    """Parse ``argv`` as ``vllm serve`` would and run vLLM's serve command; start-up errors of ours are one line."""
    from xquant_vllm.plugin import XQuantConfigError

    vllm_compat.cli_env_setup()
    args = build_parser().parse_args(["serve", *argv])
    chosen = apply_defaults(args, argv)
    command = vllm_compat.serve_subcommand()
    vllm_compat.configure_logging(args)
    logging.getLogger("vllm.xquant").info("xquant-vllm serve: %s", "; ".join(chosen))
    try:
        command.validate(args)
        command.cmd(args)
    except Exception as exc:
        cause = config_error(exc, XQuantConfigError)
        if cause is None:
            raise
        print(f"xquant-vllm serve: error: {cause}", file=sys.stderr)
        return 2
    return 0


def config_error(exc: BaseException, kind: type[Exception]) -> Exception | None:
    """The ``kind`` error behind ``exc``: raised as is, chained, or wrapped by pydantic (vLLM's configs are
    pydantic dataclasses, whose validation wraps what ``__post_init__`` raises)."""
    from pydantic import ValidationError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, ValidationError):
            for error in exc.errors():
                if isinstance(inner := (error.get("ctx") or {}).get("error"), kind):
                    return inner
        exc = exc.__cause__ or exc.__context__
    return None

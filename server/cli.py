"""``xquant-vllm serve``: options named as ``vllm serve`` names them wherever they mean the same thing.

Imports stay light here (no torch, no vLLM) so that ``xquant-vllm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import re

SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def byte_size(text: str) -> int:
    """``2147483648``, ``2G`` (10^9) or ``2GiB`` (2^30), as vLLM reads ``--kv-cache-memory-bytes``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 2147483648, 2G or 2GiB, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2) or ""])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server on vLLM's async engine, with KV-cache metrics",
        description="Serve MODEL with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
        "/v1/models), /health and Prometheus /metrics (KV capacity, blocks, bits per token, capacity ratio). "
        "--kv-cache-dtype takes vLLM's values (auto, fp8, ...) and, with this package installed, the xquant "
        "presets.",
    )
    parser.add_argument(
        "model", nargs="?", default=None, metavar="MODEL",
        help="checkpoint folder or model id (default: the bundled SmolLM2-135M-Instruct, built on first use)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: none; /health and /metrics stay open)",
    )
    parser.add_argument(
        "--served-model-name", default=None,
        help="the model name clients send (default: smollm2-135m-instruct for the bundled model, else MODEL)",
    )
    parser.add_argument(
        "--kv-cache-dtype", default="xquant",
        help="KV cache: auto (the model dtype, vLLM's baseline), fp8, or an xquant preset: xquant, xquant-1.25, "
        "xquant-max, asymkv-1.5, kivi-2, kivi-4 (default xquant; preset overrides via XQUANT_CONFIG)",
    )
    parser.add_argument(
        "--kv-cache-memory-bytes", type=byte_size, default=None,
        help="memory for the KV cache, e.g. 2GiB (default: 2 GiB on CPU unless VLLM_CPU_KVCACHE_SPACE is set; "
        "on GPU, what --gpu-memory-utilization leaves)",
    )
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9,
        help="share of GPU memory vLLM may use when --kv-cache-memory-bytes is not given (default 0.9)",
    )
    parser.add_argument("--max-model-len", type=positive_int, default=2048, help="context length (default 2048)")
    parser.add_argument(
        "--max-num-seqs", type=positive_int, default=32, help="sequences run in one batch (default 32)"
    )
    parser.add_argument(
        "--max-num-batched-tokens", type=positive_int, default=None,
        help="tokens per engine step (default: vLLM's choice)",
    )
    parser.add_argument(
        "--max-num-queued-reqs", type=positive_int, default=None,
        help="requests admitted at once, running and waiting; past it the server answers 429 with Retry-After "
        "(default: 4 x --max-num-seqs)",
    )
    parser.add_argument(
        "--block-size", type=positive_int, default=None,
        help="tokens per KV block (default: vLLM's choice; xquant presets use their key group size)",
    )
    parser.add_argument("--dtype", default="auto", help="model weights dtype (default auto: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="engine random seed (default 0)")
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
        help="reuse KV blocks of shared prompt prefixes (default: vLLM's choice)",
    )
    parser.add_argument("--tensor-parallel-size", type=positive_int, default=1, help="GPUs per model (default 1)")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile: faster start, slower steps"
    )
    parser.add_argument(
        "--timeout-graceful-shutdown", type=positive_int, default=None,
        help="seconds SIGTERM waits for in-flight requests before exiting anyway (default: no limit)",
    )
    parser.add_argument(
        "--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default info)",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .serve import serve

    if args.model is None:
        from xquant_vllm.bundled import SERVED_MODEL_NAME, ensure_model

        args.model = str(ensure_model())
        args.served_model_name = args.served_model_name or SERVED_MODEL_NAME
    if args.max_num_queued_reqs is None:
        args.max_num_queued_reqs = 4 * args.max_num_seqs
    return serve(args)

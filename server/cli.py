"""``xquant-vllm serve``: the subcommand, a pass-through to vLLM's ``vllm serve`` parser.

The options are vLLM's (and the few of :mod:`xquant_vllm.server.serve`), parsed when the command runs: this
module imports neither torch nor vLLM, so that ``xquant-vllm --help`` answers at once.
"""

from __future__ import annotations

import argparse

SUMMARY = "vLLM's OpenAI-compatible server (vllm serve) with the bundled model and the xquant KV cache by default"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # prefix_chars="+": every "--option" reaches ``options`` untouched, --help included, for vLLM's parser to read.
    parser = subparsers.add_parser("serve", help=SUMMARY, description=SUMMARY, add_help=False, prefix_chars="+")
    parser.add_argument(
        "options", nargs=argparse.REMAINDER, metavar="OPTIONS",
        help="[MODEL] and every option of `vllm serve`, plus --max-request-body-bytes; "
        "see `xquant-vllm serve --help`",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.options)

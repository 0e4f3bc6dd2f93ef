"""Run the app under uvicorn, with a SIGTERM that drains.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for in-flight responses, streams
included, before the app's shutdown stops the engine; meanwhile the app refuses new requests on open
connections with 503 and /health reports ``draining``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from types import FrameType

import uvicorn

from .app import create_app


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    app = create_app(args)
    state = app.state.server
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
    )

    def drain() -> None:
        state.draining = True

    server = DrainingServer(config, drain)
    state.stop = lambda: setattr(server, "should_exit", True)
    asyncio.run(server.serve())
    return 1 if state.startup_error is not None else 0

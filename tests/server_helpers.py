"""Starting and probing live OpenAI servers for the server tests (a plain helper module, not a test file)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 420
VLLM = Path(sys.executable).with_name("vllm")


@dataclass
class Server:
    url: str
    key: str
    proc: subprocess.Popen
    log: Path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metric(self, name: str, text: str | None = None, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there is none), in ``text``
        (one scrape of /metrics) or in a new scrape."""
        total = 0.0
        text = self.metrics_text() if text is None else text
        for sample_labels, value in re.findall(rf"^{re.escape(name)}(?:{{(.*?)}})? (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', sample_labels))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, port: int, key: str, env: dict[str, str] | None = None) -> Server:
    """Start a server process and wait until /health answers 200 (fails the test with the log's tail if not)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    srv = Server(f"http://127.0.0.1:{port}", key, proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{cmd[:3]} exited with {proc.returncode} during start:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            srv.stop()
            pytest.fail(f"{cmd[:3]} not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        time.sleep(1)

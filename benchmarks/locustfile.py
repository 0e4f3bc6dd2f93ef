"""Locust users for the load test: long essay prompts, half streamed and half not, against one server.

Run by :mod:`benchmarks.load` (which starts the server and reads the results), or alone:
``locust -f benchmarks/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000``.
Settings come from the environment: ``LOAD_PROMPT_WORDS`` (words of essay per prompt, default 1000),
``LOAD_MAX_TOKENS`` (default 64), ``LOAD_API_KEY``. Besides Locust's own request rows, each streamed request
reports its time to first token as a ``TTFT`` row and its time to ``[DONE]`` as an ``E2E`` row (Locust's own row
for a streamed request stops at the response headers); ``response_length`` holds output tokens.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

from xquant_vllm.essays import load_essays

PROMPT_WORDS = int(os.environ.get("LOAD_PROMPT_WORDS", "1000"))
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "64"))
API_KEY = os.environ.get("LOAD_API_KEY", "")
QUESTION = "\n\nIn one sentence, what is the main point of the text above?"

_WORDS: list[list[str]] = []


@events.init.add_listener
def load_corpus(environment, **kwargs) -> None:
    """Essays long enough for one prompt each, as word lists (loaded once per Locust process)."""
    _WORDS.extend(w for w in (e.text.split() for e in load_essays(progress=False)) if len(w) >= PROMPT_WORDS)
    if not _WORDS:
        raise RuntimeError(f"no essay has {PROMPT_WORDS} words; lower LOAD_PROMPT_WORDS")


def long_prompt(rng: random.Random) -> str:
    words = rng.choice(_WORDS)
    start = rng.randrange(len(words) - PROMPT_WORDS + 1)
    return " ".join(words[start:start + PROMPT_WORDS]) + QUESTION


class CompletionUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        self.model = self.client.get("/v1/models", headers=self.headers).json()["data"][0]["id"]

    def body(self, stream: bool) -> dict:
        return {"model": self.model, "prompt": long_prompt(self.rng), "max_tokens": MAX_TOKENS,
                "temperature": 0.7, "stream": stream}

    @task
    def non_streamed(self) -> None:
        with self.client.post("/v1/completions", json=self.body(False), headers=self.headers,
                              name="completion", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            r.request_meta["response_length"] = r.json()["usage"]["completion_tokens"]

    @task
    def streamed(self) -> None:
        start = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post("/v1/completions", json=self.body(True), headers=self.headers, stream=True,
                              name="completion-stream", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            done = False
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                if json.loads(line[6:])["choices"][0]["text"]:
                    tokens += 1  # one chunk per engine step: one token per chunk
                    first = first or time.perf_counter()
            if not done:
                r.failure("stream ended without [DONE]")
                return
            r.request_meta["response_length"] = tokens
        end = time.perf_counter()
        for kind, seconds in (("TTFT", (first or end) - start), ("E2E", end - start)):
            self.environment.events.request.fire(
                request_type=kind, name="completion-stream", response_time=seconds * 1000,
                response_length=tokens, exception=None, context={},
            )

"""The OpenAI-compatible server, live: one ``xquant-vllm serve`` process for the module, driven by the real
``openai`` client and by raw HTTP where the client would hide what is checked (status codes, headers, bodies).

The cache dtype is ``auto`` unless ``XQUANT_TEST_SERVER_KV_DTYPE`` names another (e.g. ``xquant``): every test
holds for any dtype, and the capacity check compares /metrics with :mod:`xquant_vllm.accounting` for it.
The SIGTERM test stops the server, so it comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from xquant_vllm.accounting import SMOLLM2, bits_report
from xquant_vllm.bundled import SERVED_MODEL_NAME
from xquant_vllm.config import PRESETS, make_config
from xquant_vllm.tail import SLOT_MARGIN

pytestmark = [pytest.mark.engine, pytest.mark.model]

KV_DTYPE = os.environ.get("XQUANT_TEST_SERVER_KV_DTYPE", "auto")
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 16
MAX_QUEUED = 40
KV_BYTES = 1 << 30
START_TIMEOUT_S = 300


@dataclass
class Server:
    url: str
    key: str
    proc: subprocess.Popen
    log: Path

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics by name."""
        text = httpx.get(f"{self.url}/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(xquant_\w+) (\S+)$", text, re.M)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port, key = _free_port(), "sk-test-" + os.urandom(8).hex()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "xquant_vllm.cli", "serve",  # no MODEL: the bundled SmolLM2
        "--port", str(port), "--api-key", key, "--kv-cache-dtype", KV_DTYPE,
        "--kv-cache-memory-bytes", str(KV_BYTES), "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-queued-reqs", str(MAX_QUEUED), "--enforce-eager",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", key, proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} during start:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_health_and_models(server: Server, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_MODEL_NAME]
    assert models[0].model_extra["kv_cache_dtype"] == KV_DTYPE
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion(client: openai.OpenAI, tokenizer) -> None:
    prompt = "The capital of France is"
    first = client.completions.create(model=SERVED_MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
    again = client.completions.create(model=SERVED_MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert first.object == "text_completion" and first.id.startswith("cmpl-")
    assert first.choices[0].text and first.choices[0].text == again.choices[0].text  # greedy is deterministic
    assert first.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    assert first.usage.completion_tokens <= 8
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_chat_uses_the_chat_template(client: openai.OpenAI, tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=SERVED_MODEL_NAME, messages=messages, max_tokens=32, temperature=0)
    message = reply.choices[0].message
    assert reply.object == "chat.completion" and message.role == "assistant"
    assert message.content.strip()
    # The prompt is the template with the assistant's generation prompt; without it the model writes "assistant".
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated.endswith("<|im_start|>assistant\n")
    assert reply.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)
    assert not message.content.lstrip().startswith("assistant")


def test_completion_stream_matches_non_streamed(client: openai.OpenAI) -> None:
    args = dict(model=SERVED_MODEL_NAME, prompt="Here is a short story about a robot:", max_tokens=24, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    pieces, arrivals, reasons = [], [], []
    for chunk in client.completions.create(**args, stream=True):
        arrivals.append(time.monotonic())
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole
    assert len([p for p in pieces if p]) >= 8  # token by token, not one blob
    assert arrivals[-1] - arrivals[0] > 0.05  # and spread over the generation
    assert reasons[-1] in ("length", "stop") and not any(reasons[:-1])


def test_chat_stream_matches_non_streamed(client: openai.OpenAI) -> None:
    args = dict(
        model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=24,
        temperature=0,
    )
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 8
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 24
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")


def test_stream_ends_with_done(server: Server) -> None:
    body = {"model": SERVED_MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "stream": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.auth(), timeout=60)
    events = [line for line in r.text.split("\n\n") if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


LONG_TEXT = "word " * 3000
C, CH = "/v1/completions", "/v1/chat/completions"
CHAT = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (endpoint, raw body or dict, status, the field the error must name)
    (C, b'{"model": "x", "prompt": ', 400, "body"),
    (C, b"[1, 2]", 400, "body"),
    (C, {"prompt": "hi"}, 400, "model"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    (C, {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    (C, {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "hi", "n": 0}, 400, "n"),
    (C, {"prompt": "hi", "n": 1000}, 400, "n"),
    (C, {"prompt": "hi", "stream": "yes please"}, 400, "stream"),
    (C, {"prompt": "hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    (C, {"prompt": LONG_TEXT}, 400, "prompt"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (CH, {"messages": []}, 400, "messages"),
    (CH, {"messages": "hi"}, 400, "messages"),
    (CH, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    (CH, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CH, {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    (CH, {"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    (CH, {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages"),
    (CH, {"messages": CHAT, "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD_INPUTS)
def test_bad_input_names_the_field(server: Server, path: str, body, status: int, field: str) -> None:
    if isinstance(body, dict):
        body = json.dumps({"model": SERVED_MODEL_NAME, **body} if field != "model" or "model" in body else body)
    r = httpx.post(server.url + path, content=body, headers={**server.auth(), "content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field
    assert field.split(".")[0] in error["message"] or field == "body"


def test_openai_client_sees_the_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=SERVED_MODEL_NAME, prompt="hi", temperature=7)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "sk-test", "Basic abc"])
def test_api_key_required(server: Server, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in (("GET", "/v1/models", None), ("POST", C, {"model": SERVED_MODEL_NAME, "prompt": "x"})):
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert server.key not in r.text and "wrong-key" not in r.text and SERVED_MODEL_NAME not in r.text
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_client_disconnect_aborts_and_frees_blocks(server: Server, tokenizer) -> None:
    # Counting continues for hundreds of tokens under greedy decoding, so only the disconnect can end it early.
    prompt = ", ".join(str(i) for i in range(1, 200)) + ","
    prompt_tokens = len(tokenizer(prompt).input_ids)
    max_tokens = MAX_MODEL_LEN - prompt_tokens
    body = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    before = server.metrics()
    assert before["xquant_kv_blocks_used"] == 0
    with httpx.stream("POST", f"{server.url}{C}", json=body, headers=server.auth(), timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(10)) if line.startswith("data:")) >= 4
        during = server.metrics()
    assert during["xquant_requests_running"] == 1
    block = during["xquant_kv_block_size_tokens"]
    assert during["xquant_kv_blocks_used"] >= prompt_tokens // block
    assert during["xquant_kv_blocks_used"] + during["xquant_kv_blocks_free"] == before["xquant_kv_blocks_free"]
    deadline = time.monotonic() + 15
    while (after := server.metrics())["xquant_kv_blocks_used"] or after["xquant_requests_running"]:
        assert time.monotonic() < deadline, f"blocks not freed after the disconnect: {after}"
        time.sleep(0.2)
    assert after["xquant_kv_blocks_free"] == before["xquant_kv_blocks_free"]
    generated = after["xquant_generation_tokens_total"] - before["xquant_generation_tokens_total"]
    assert generated < max_tokens / 2  # aborted long before max_tokens


def test_32_parallel_streams(server: Server) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=SERVED_MODEL_NAME, messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=16, temperature=0.8, seed=i, stream=True,
        )
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)), return_exceptions=True)

    results = asyncio.run(run())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert all(text and reason in ("length", "stop") for text, reason in results)


def test_full_queue_answers_429(server: Server) -> None:
    total = MAX_QUEUED + 16
    body = {"model": SERVED_MODEL_NAME, "prompt": "Write a long letter to a friend.", "max_tokens": 48}
    rejected_before = server.metrics()["xquant_requests_rejected_total"]

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=total)
        async with httpx.AsyncClient(headers=server.auth(), timeout=120, limits=limits) as c:
            return await asyncio.gather(*(c.post(f"{server.url}{C}", json=body) for _ in range(total)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert set(codes) <= {200, 429} and refused, codes
    assert codes.count(200) >= MAX_QUEUED // 2
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    assert all(r.json()["choices"][0]["finish_reason"] in ("length", "stop") for r in responses if r.status_code == 200)
    assert server.metrics()["xquant_requests_rejected_total"] - rejected_before == len(refused)


def test_metrics_capacity_matches_accounting(server: Server) -> None:
    m = server.metrics()
    block, capacity = m["xquant_kv_block_size_tokens"], m["xquant_kv_capacity_tokens"]
    kv_bytes = m["xquant_kv_cache_bytes"]
    dtype_bytes_per_token = SMOLLM2.elements_per_token * SMOLLM2.dtype_bytes
    assert kv_bytes == KV_BYTES
    assert m["xquant_kv_model_dtype_bits"] == 16
    if KV_DTYPE in PRESETS:
        report = bits_report(make_config(KV_DTYPE, num_layers=30, head_size=64), SMOLLM2)
        expected_ratio = report.capacity_ratio(KV_BYTES, MAX_NUM_SEQS + SLOT_MARGIN)  # the plugin's tail slots
        assert m["xquant_kv_bytes_per_token"] == pytest.approx(report.bytes_per_token)
        assert m["xquant_kv_true_bits"] == pytest.approx(report.true_bits(MAX_MODEL_LEN))
    else:
        expected_ratio = 1.0
        assert m["xquant_kv_bytes_per_token"] == dtype_bytes_per_token
        assert m["xquant_kv_true_bits"] == 16
    # vLLM's capacity against the model dtype in the same memory, within one block (vLLM keeps a null block).
    assert m["xquant_kv_capacity_ratio"] == pytest.approx(capacity * dtype_bytes_per_token / kv_bytes)
    assert m["xquant_kv_capacity_ratio"] == pytest.approx(expected_ratio, abs=block * dtype_bytes_per_token / kv_bytes)
    assert m["xquant_kv_blocks_free"] + m["xquant_kv_blocks_used"] == capacity // block - 1  # less the null block
    # Live figures were recorded by the requests above.
    assert m["xquant_prompt_tokens_total"] > 0 and m["xquant_generation_tokens_total"] > 0
    assert m["xquant_request_latency_seconds_count"] > 0 and m["xquant_time_to_first_token_seconds_count"] > 0


def test_sigterm_drains_in_flight_requests(server: Server) -> None:
    """Last: stops the server. A stream in flight at SIGTERM runs to its end; then the process exits."""
    body = {"model": SERVED_MODEL_NAME, "prompt": "1, 2, 3, 4,", "max_tokens": 64, "temperature": 0, "stream": True}
    texts, reason = [], None
    with httpx.stream("POST", f"{server.url}{C}", json=body, headers=server.auth(), timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if not texts:
                server.proc.send_signal(signal.SIGTERM)
            if line == "data: [DONE]":
                break
            choice = json.loads(line[6:])["choices"][0]
            texts.append(choice["text"])
            reason = choice["finish_reason"] or reason
    assert line == "data: [DONE]" and reason == "length"
    assert len([t for t in texts if t]) >= 32  # the whole answer, token by token, after the signal
    server.proc.wait(60)
    assert server.proc.returncode in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)

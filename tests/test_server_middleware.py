"""The HTTP edges of ``xquant-vllm serve`` without an engine: the middleware around a stand-in app."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from xquant_vllm import vllm_compat
from xquant_vllm.server.middleware import XQuantServerEdges, openai_error, surrogate_field
from xquant_vllm.server.serve import byte_size

LIMIT = 1000


def make_app(queue_limit: int | None = None) -> FastAPI:
    app = FastAPI()
    app.state.args = argparse.Namespace(max_request_body_bytes=LIMIT, max_num_queued_reqs=queue_limit)

    @app.post("/v1/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"length": len(await request.body())})

    @app.post("/v1/busy")
    async def busy() -> JSONResponse:  # what vLLM 0.32 answers past --max-num-queued-reqs
        message = next(iter(vllm_compat.queue_full_messages()), "busy")
        return JSONResponse({"error": {"message": message, "type": "Service Unavailable", "param": None,
                                       "code": 503}}, status_code=503)

    app.add_middleware(XQuantServerEdges)
    return app


async def call(app: FastAPI, method: str, path: str, **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.request(method, path, **kw)


def run(app: FastAPI, method: str, path: str, **kw) -> httpx.Response:
    import asyncio

    return asyncio.run(call(app, method, path, **kw))


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_body_under_the_limit_reaches_the_app_whole() -> None:
    body = json.dumps({"prompt": "x" * (LIMIT - 20)}).encode()
    assert run(make_app(), "POST", "/v1/echo", content=body).json() == {"length": len(body)}


def test_body_over_the_limit_is_413_by_length_and_by_bytes_read() -> None:
    error = error_of(run(make_app(), "POST", "/v1/echo", content=b"x" * (LIMIT + 1)), 413)
    assert error["param"] == "body" and str(LIMIT) in error["message"]

    async def chunks():  # no Content-Length
        yield b"x" * 600
        yield b"x" * 600

    error_of(run(make_app(), "POST", "/v1/echo", content=chunks()), 413)


def test_lone_surrogates_are_named() -> None:
    assert surrogate_field(b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}') == "messages.0.content"
    assert surrogate_field(b'{"prompt": ["ok", "\\udc00"]}') == "prompt.1"
    assert surrogate_field(b'{"prompt": "a pair \\ud83d\\ude00 is one character"}') is None
    assert surrogate_field(b'{"prompt": "\\\\ud800 is an escaped backslash"}') is None
    error = error_of(run(make_app(), "POST", "/v1/echo", content=b'{"prompt": "\\udfff"}'), 400)
    assert error["param"] == "prompt" and "surrogate" in error["message"]


@pytest.mark.parametrize(("status", "body", "message"), [
    (404, b'{"detail": "Not Found"}', "Not Found"),
    (405, b'{"detail": "Method Not Allowed"}', "Method Not Allowed"),
    (401, b'{"error": "Unauthorized"}', "Unauthorized"),
    (500, b"Internal Server Error", "Internal Server Error"),
])
def test_errors_not_in_openai_shape_are_rewritten(status: int, body: bytes, message: str) -> None:
    new_status, new_body = openai_error(status, body, frozenset())
    assert new_status == status
    assert json.loads(new_body)["error"] == {"message": message, "type": message, "param": None, "code": status}


def test_errors_in_openai_shape_pass_unchanged() -> None:
    assert openai_error(400, b'{"error": {"message": "m", "type": "t", "param": "p", "code": 400}}', frozenset()) \
        is None


def test_unknown_route_and_method_through_the_middleware() -> None:
    assert error_of(run(make_app(), "GET", "/nothing"), 404)["message"] == "Not Found"
    error_of(run(make_app(), "GET", "/v1/echo"), 405)


@pytest.mark.skipif(not vllm_compat.queue_full_messages(), reason="this vLLM has no admission limit of its own")
def test_vllm_queue_full_503_becomes_429_with_retry_after() -> None:
    r = run(make_app(), "POST", "/v1/busy", content=b"{}")
    error_of(r, 429)
    assert r.headers["retry-after"] == "1"


def test_own_queue_bound_where_vllm_has_none() -> None:
    app = make_app(queue_limit=0)
    if vllm_compat.engine_queue_limit():  # vLLM bounds the queue: the middleware does not count
        assert run(app, "POST", "/v1/echo", content=b"{}").status_code == 200
    else:
        r = run(app, "POST", "/v1/echo", content=b"{}")
        error_of(r, 429)
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize(("text", "value"), [("256MiB", 256 << 20), ("2GiB", 2 << 30), ("2G", 2 << 30),
                                             ("2g", 2 * 10**9), ("1048576", 1 << 20)])
def test_kv_cache_memory_sizes(text: str, value: int) -> None:
    assert byte_size(text) == value

"""What ``xquant-vllm serve`` adds at the HTTP edge of vLLM's server, as one ASGI middleware (vLLM's ``--middleware``).

* A request body past ``--max-request-body-bytes`` gets 413 before it is read (by its Content-Length) or as soon
  as the bytes read pass the limit; vLLM would tokenize it first.
* A lone UTF-16 surrogate (``"\\ud800"``, valid JSON, not encodable text) gets a 400 naming its field instead of
  the tokenizer's internals.
* Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` as vLLM writes its own:
  FastAPI's ``{"detail": ...}`` (404, 405) and the authentication middleware's ``{"error": "Unauthorized"}`` too.
* A full queue is 429 with Retry-After: vLLM 0.32 refuses past ``--max-num-queued-reqs`` with a 503, rewritten
  here; on vLLM 0.26, which has no such limit, this middleware bounds the requests in flight itself.
* ``xquant_requests_rejected_total{reason}`` counts what it refuses (vLLM 0.32 counts its own admission
  rejections too, ``vllm:admission_rejections_total``); ``xquant_requests_aborted_total`` counts clients that went
  away before their answer ended (vLLM aborts those requests, frees their blocks, and counts them nowhere).

Settings come from vLLM's parsed arguments (``app.state.args``), so they hold in every API-server process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from prometheus_client import Counter

from xquant_vllm import vllm_compat

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_S = 1
# A \uD800-\uDFFF escape: the only way a JSON body can hold a surrogate; checked further only when present.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
ABORTED = Counter("xquant_requests_aborted", "Requests whose client disconnected before the answer ended")
REJECTED = Counter(
    "xquant_requests_rejected", "Requests xquant-vllm serve refused: 413 (body_too_large) or 429 (queue_full)",
    ["reason"]
)


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """vLLM's error body (OpenAI's fields, ``type`` the status phrase as vLLM writes it, ``code`` the status)."""
    phrase = HTTPStatus(status).phrase
    return json.dumps({"error": {"message": message, "type": phrase, "param": param, "code": status}}).encode()


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def surrogate_field(body: bytes) -> str | None:
    """The path (``messages.0.content``) of the first string holding a lone surrogate, else None."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # vLLM names the JSON error itself

    def walk(value: Any, path: str) -> str | None:
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return path or "body"
            return None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if found := walk(item, f"{path}.{key}" if path else str(key)):
                return found
        return None

    return walk(data, "")


def openai_error(status: int, body: bytes, queue_full: frozenset[str]) -> tuple[int, bytes] | None:
    """A replacement (status, body) for an error body not in OpenAI's shape or a 503 for a full queue; else None."""
    try:
        data = json.loads(body)
    except ValueError:
        return status, error_body(status, body.decode(errors="replace") or HTTPStatus(status).phrase)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        if status == 503 and error.get("message") in queue_full:
            return 429, error_body(429, error["message"])
        return None
    detail = data.get("detail", error) if isinstance(data, dict) else data
    return status, error_body(status, detail if isinstance(detail, str) else json.dumps(detail))


class XQuantServerEdges:
    """The ASGI middleware; vLLM's ``--middleware server.middleware.XQuantServerEdges`` adds it outermost."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self.in_flight = 0
        self.queue_full = vllm_compat.queue_full_messages()
        self.own_queue_limit = not vllm_compat.engine_queue_limit()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        args = scope["app"].state.args
        if scope["method"] in ("POST", "PUT", "PATCH"):
            limit = getattr(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES)
            body = await self._read_body(scope, receive, send, limit)
            if body is None:
                return
            if field := surrogate_field(body):
                return await respond(send, 400, error_body(
                    400, f"{field}: the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                    "which is not a character; send valid Unicode", field))
            receive = self._replay(body, receive)
        bound = getattr(args, "max_num_queued_reqs", None) if self.own_queue_limit else None
        counted = bound is not None and scope["method"] == "POST" and scope["path"].startswith("/v1/")
        if counted and self.in_flight >= bound:
            REJECTED.labels(reason="queue_full").inc()
            return await respond(send, 429, error_body(429, f"The request queue is full ({bound} requests); retry "
                                                       "later."), [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.in_flight += counted
        ended = False

        async def send_counted(message: Message) -> None:
            nonlocal ended
            ended = ended or (message["type"] == "http.response.body" and not message.get("more_body", False))
            await send(message)

        async def receive_counted() -> Message:
            nonlocal ended
            message = await receive()
            if message["type"] == "http.disconnect" and not ended:
                ended = True  # counted once, however often the app asks again
                ABORTED.inc()
            return message

        try:
            await self.app(scope, receive_counted, self._errors_in_shape(send_counted))
        finally:
            self.in_flight -= counted

    async def _read_body(self, scope: Message, receive: Receive, send: Send, limit: int) -> bytes | None:
        """The whole body, or None once a 413 (or nothing, for a client gone) has been answered."""
        length = dict(scope["headers"]).get(b"content-length")
        too_large = f"The request body is larger than this server's limit of {limit} bytes (--max-request-body-bytes)."
        if length is not None and length.isdigit() and int(length) > limit:
            REJECTED.labels(reason="body_too_large").inc()
            await respond(send, 413, error_body(413, too_large, "body"), [(b"connection", b"close")])
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                REJECTED.labels(reason="body_too_large").inc()
                await respond(send, 413, error_body(413, too_large, "body"), [(b"connection", b"close")])
                return None
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """The body once, then the client's own messages (vLLM watches them for a disconnect)."""
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _errors_in_shape(self, send: Send) -> Send:
        """Holds back an error response (status >= 400) to rewrite it; everything else passes through."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_error(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, body = start["status"], b"".join(chunks)
            headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
            if (rewritten := openai_error(status, body, self.queue_full)) is not None:
                status, body = rewritten
                if status == 429:
                    REJECTED.labels(reason="queue_full").inc()
                    headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            await respond(send, status, body, headers)

        return send_error

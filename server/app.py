"""The FastAPI app: OpenAI routes, health, metrics, and what happens at the edges.

Edges: a request body is validated before it reaches the engine (errors name the field); a full queue answers
429 with Retry-After; a client that goes away cancels its handler, which aborts the engine request and frees its
KV blocks; while draining (SIGTERM) new requests get 503 and running ones finish.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from vllm.exceptions import MaxQueuedTokensError, QueueOverflowError, VLLMValidationError
from vllm.outputs import RequestOutput
from vllm.renderers.params import ChatParams, TokenizeParams
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from .engine import start_engine
from .errors import UNAUTHORIZED, APIError, from_validation
from .formats import ChatFormat, CompletionFormat, generated_tokens, sse, usage_of
from .metrics import ServerMetrics, kv_figures
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields

log = logging.getLogger("xquant_vllm.server")
Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")
Format = CompletionFormat | ChatFormat
RETRY_AFTER_S = 1
CHAT_PARAMS = ChatParams(chat_template_kwargs={"add_generation_prompt": True})


@dataclass
class ServerState:
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    engine: AsyncLLM | None = None
    model_name: str = ""
    max_model_len: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    startup_error: BaseException | None = None
    stop: Callable[[], None] = lambda: None  # asks the HTTP server to exit (set by :func:`serve`)

    def ready_engine(self) -> AsyncLLM:
        if self.draining:
            raise APIError(503, "The server is shutting down.", type="server_error", code="draining")
        if self.engine is None:
            raise APIError(503, "The model is still loading.", type="server_error", code="loading")
        if self.engine.errored:
            raise APIError(503, "The engine has stopped.", type="server_error", code="engine_dead")
        return self.engine


# ---- request parsing -----------------------------------------------------------------------------------


async def parse_body(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}", param="body") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.", param="body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


def check_model(state: ServerState, body: SamplingFields) -> None:
    if body.model != state.model_name:
        raise APIError(
            404, f"The model '{body.model}' does not exist; this server serves '{state.model_name}'.",
            param="model", code="model_not_found",
        )


def check_length(state: ServerState, prompt_len: int, max_tokens: int | None, prompt_field: str) -> int:
    """The output budget: ``max_tokens``, or the rest of the context when None; errors name the field."""
    limit = state.max_model_len
    if prompt_len >= limit:
        raise APIError(
            400, f"{prompt_field} has {prompt_len} tokens; the context holds {limit} (prompt and output together).",
            param=prompt_field, code="context_length_exceeded",
        )
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise APIError(
            400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the context of {limit}; "
            f"ask for at most {limit - prompt_len}.", param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(body: SamplingFields, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop,
        seed=body.seed,
        max_tokens=max_tokens,
        output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
    )


# ---- running a request ---------------------------------------------------------------------------------


async def first_output(state: ServerState, prompt: dict, params: SamplingParams, request_id: str):
    """Start a request and wait for its first output, so that queue and validation errors precede any header."""
    outputs = state.ready_engine().generate(prompt, params, request_id)
    try:
        first = await anext(outputs)
    except Exception as exc:
        await outputs.aclose()
        error = engine_error(exc)
        if error.status == 429:
            state.metrics.rejected.inc()
        raise error from exc
    return first, outputs


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, (QueueOverflowError, MaxQueuedTokensError)):
        return APIError(
            429, "The server's request queue is full; retry later.", type="rate_limit_error",
            code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, VLLMValidationError):
        return APIError(400, str(exc), param=exc.parameter)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "The engine has stopped.", type="server_error", code="engine_dead")
    log.exception("request failed", exc_info=exc)
    return APIError(500, "Internal error while generating.", type="server_error")


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


async def collect(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
    """The final output of a non-streamed request (FINAL_ONLY: the last item holds every choice)."""
    final = first
    async for out in rest:
        final = out
    return final


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` until done or until the client disconnects; disconnecting cancels it (and so aborts the request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "The client closed the request.", code="client_closed")
    return task.result()


async def events(
    fmt: Format, first: RequestOutput, rest: AsyncIterator[RequestOutput], usage: bool
) -> AsyncIterator[str]:
    """The SSE stream of a request. Closing it (a client that went away) closes ``rest``, which aborts the request."""
    for chunk in fmt.opening():
        yield sse(chunk)
    generated, last = 0, first
    async with aclosing(rest):
        async for out in prepend(first, rest):
            last = out
            generated += generated_tokens(out)
            for chunk in fmt.deltas(out):
                yield sse(chunk)
    if usage:
        yield sse(fmt.usage_chunk(usage_of(last, generated)))
    yield sse("[DONE]")


async def respond(
    request: Request, state: ServerState, body: SamplingFields, engine_input: dict, max_tokens: int, fmt: Format
) -> Response:
    """Run one request to a whole response or an SSE stream; a client that disconnects aborts it either way."""
    params = sampling_params(body, max_tokens)
    first, rest = await cancel_on_disconnect(request, first_output(state, engine_input, params, fmt.request_id))
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(events(fmt, first, rest, usage), media_type="text/event-stream")
    final = await cancel_on_disconnect(request, collect(first, rest))
    return JSONResponse(fmt.whole(final).model_dump())


def tok_params(engine: AsyncLLM, chat: bool = False) -> TokenizeParams:
    """vLLM's tokenization defaults without its length cap: the server checks length itself to name the field."""
    base = engine.renderer.default_chat_tok_params if chat else engine.renderer.default_cmpl_tok_params
    return dataclasses.replace(base, max_total_tokens=None)


async def render(work: Awaitable[T], field_name: str) -> T:
    """Await vLLM's renderer; what it refuses is the client's input, named by ``field_name``."""
    try:
        return await work
    except (VLLMValidationError, ValueError, TypeError) as exc:
        raise APIError(400, f"{field_name}: {exc}", param=field_name) from None


# ---- the app -------------------------------------------------------------------------------------------


def create_app(args: argparse.Namespace) -> FastAPI:
    state = ServerState()

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(start_engine, args, state.metrics)
        except Exception as exc:  # logged; the server then exits with status 1
            state.startup_error = exc
            log.exception("engine start failed")
            state.stop()
            return
        mc = engine.model_config
        state.model_name = mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model
        state.max_model_len = mc.max_model_len
        kv = kv_figures(engine.vllm_config)
        state.metrics.set_kv(kv)
        state.engine = engine
        log.info(
            "ready: model=%s kv_cache_dtype=%s capacity=%d tokens (%.2fx the model dtype), %.1f bytes/token",
            state.model_name, kv.cache_dtype, kv.capacity_tokens, kv.capacity_ratio, kv.bytes_per_token,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            if state.engine is not None:
                state.engine.shutdown()

    app = FastAPI(title="xquant-vllm", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def require_key(request: Request, call_next: Callable) -> Response:
        key = args.api_key
        if key and request.url.path.startswith("/v1"):
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
                return UNAUTHORIZED.response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.startup_error is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        try:
            await state.engine.check_health()
        except Exception:
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        engine = state.ready_engine()
        card = ModelCard(
            id=state.model_name, created=state.created, max_model_len=state.max_model_len,
            kv_cache_dtype=engine.vllm_config.cache_config.cache_dtype,
        )
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        engine = state.ready_engine()
        check_model(state, body)
        prompt = {"prompt_token_ids": body.prompt} if isinstance(body.prompt, list) else {"prompt": body.prompt}
        (engine_input,) = await render(engine.renderer.render_cmpl_async([prompt], tok_params(engine)), "prompt")
        max_tokens = check_length(state, len(engine_input["prompt_token_ids"]), body.max_tokens, "prompt")
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", state.model_name, int(time.time()), body.n)
        return await respond(request, state, body, engine_input, max_tokens, fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        engine = state.ready_engine()
        check_model(state, body)
        messages = [m.model_dump() for m in body.messages]
        rendering = engine.renderer.render_chat_async([messages], CHAT_PARAMS, tok_params(engine, chat=True))
        _, (engine_input,) = await render(rendering, "messages")
        wanted = body.max_completion_tokens or body.max_tokens
        max_tokens = check_length(state, len(engine_input["prompt_token_ids"]), wanted, "messages")
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", state.model_name, int(time.time()), body.n)
        return await respond(request, state, body, engine_input, max_tokens, fmt)

    return app

"""vLLM outputs in OpenAI's shapes: one class per endpoint, for whole responses and for streamed chunks.

Streams use ``RequestOutputKind.DELTA`` (each output holds only the new text of each choice), whole responses
``FINAL_ONLY`` (one output holding every choice).
"""

from __future__ import annotations

from pydantic import BaseModel
from vllm.outputs import CompletionOutput, RequestOutput

from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)


def usage_of(out: RequestOutput, completion_tokens: int) -> Usage:
    prompt = len(out.prompt_token_ids or ())
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def generated_tokens(out: RequestOutput) -> int:
    return sum(len(c.token_ids) for c in out.outputs)


class CompletionFormat:
    """``/v1/completions``: ``text_completion`` objects, whole or as chunks of new text."""

    def __init__(self, request_id: str, model: str, created: int, n: int) -> None:
        self.request_id, self.model, self.created, self.n = request_id, model, created, n

    def _wrap(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)

    def opening(self) -> list[BaseModel]:
        return []

    def deltas(self, out: RequestOutput) -> list[BaseModel]:
        return [self._wrap([CompletionChoice(index=c.index, text=c.text, finish_reason=_reason(c))])
                for c in out.outputs]

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._wrap([], usage)

    def whole(self, final: RequestOutput) -> BaseModel:
        choices = [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason) for c in final.outputs]
        return self._wrap(choices, usage_of(final, generated_tokens(final)))


class ChatFormat:
    """``/v1/chat/completions``: a ``chat.completion``, or chunks: the role first, then content, then the reason."""

    def __init__(self, request_id: str, model: str, created: int, n: int) -> None:
        self.request_id, self.model, self.created, self.n = request_id, model, created, n

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)

    def opening(self) -> list[BaseModel]:
        role = ChatDelta(role="assistant", content="")
        return [self._chunk([ChatChunkChoice(index=i, delta=role, finish_reason=None) for i in range(self.n)])]

    def deltas(self, out: RequestOutput) -> list[BaseModel]:
        chunks: list[BaseModel] = []
        for c in out.outputs:
            if c.text:
                chunks.append(self._chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(content=c.text),
                                                           finish_reason=None)]))
            if c.finished():
                chunks.append(self._chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(),
                                                           finish_reason=c.finish_reason)]))
        return chunks

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def whole(self, final: RequestOutput) -> BaseModel:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                   for c in final.outputs]
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                      usage=usage_of(final, generated_tokens(final)))


def _reason(c: CompletionOutput) -> str | None:
    return c.finish_reason if c.finished() else None


def sse(payload: BaseModel | str) -> str:
    """One server-sent event: a JSON object, or the closing ``[DONE]``."""
    return f"data: {payload if isinstance(payload, str) else payload.model_dump_json()}\n\n"

"""Errors in OpenAI's shape, raised anywhere in a request and turned into a response in one place."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .protocol import ErrorBody, ErrorResponse


class APIError(Exception):
    """An error a client can act on: HTTP status, message, and the request field it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.body).model_dump(), status_code=self.status, headers=self.headers)


# Pydantic tags each member of a union in the error location (``prompt.str``, ``stop.list[str]``).
_UNION_TAGS = {"str", "int", "float", "bool"}


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))) or "body"


def from_validation(exc: ValidationError) -> APIError:
    """400 naming the first bad field (``messages.0.role``); the message lists every problem, per field."""
    problems: dict[str, list[str]] = {}
    for err in exc.errors(include_url=False):
        problems.setdefault(_field(err["loc"]), []).append(err["msg"])
    message = "; ".join(f"{field}: {' or '.join(msgs)}" for field, msgs in problems.items())
    return APIError(400, message, param=next(iter(problems)))


UNAUTHORIZED = APIError(401, "Incorrect or missing API key.", type="authentication_error", code="invalid_api_key")

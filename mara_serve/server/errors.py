"""Every error the server returns, in OpenAI's shape, from ONE table.

Body: `{"error": {"message", "type", "param", "code"}}`. `ERROR_TABLE` maps each exception type
(ours, the engine's, FastAPI's) to its payload; `describe(exc)` walks the exception's MRO to the
first row, so the HTTP handlers and the in-band error events of streams give the same answer.

| exception                       | status | code                              |
| ------------------------------- | ------ | --------------------------------- |
| RequestValidationError          | 400    | pydantic error type, invalid_json |
| InvalidRequestError (engine)    | 400    | invalid_value                     |
| ContextLengthExceededError      | 400    | context_length_exceeded           |
| AgentLoadError                  | 400    | invalid_agent                     |
| APIError subclasses             | theirs (401 invalid_api_key, 404 model_not_found, 413, …) |
| RequestTimeoutError (APIError)  | 408 (request_timeout_s passed)    | request_timeout          |
| HTTPException (routing)         | its status (404 unknown route, 405 wrong method)           |
| QueueFullError                  | 429 + Retry-After                 | queue_full               |
| EngineDeadError                 | 503 + Retry-After                 | engine_dead              |
| EngineNotReadyError             | 503 + Retry-After                 | engine_not_ready         |
| RequestAbortedError             | 503 + Retry-After                 | request_aborted          |
| GenerationError (APIError)      | 500 (engine failed the request)   | generation_failed        |
| any other exception             | 500 (logged under an error id)    | internal_error           |

A 500 never carries exception text: the cause is logged with the request or error id, and the
message gives the client that id. Bad input never reaches the 500 row: bounds live in the
protocol models and the engine's `InvalidRequestError`s.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mara_serve.engine.errors import (
    AgentLoadError,
    ContextLengthExceededError,
    EngineDeadError,
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
    RequestAbortedError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_BUSY = 1  # seconds; queue full: a slot frees up within a few tokens
RETRY_AFTER_UNAVAIL = 5  # seconds; loading or draining: that takes seconds either way


@dataclass(frozen=True)
class ErrorPayload:
    status_code: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class APIError(Exception):
    """An error raised by the server itself, carrying its status and OpenAI error fields."""

    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}
        if status_code is not None:
            self.status_code = status_code

    def payload(self) -> ErrorPayload:
        return ErrorPayload(
            self.status_code, self.message, self.error_type, self.param, self.code, self.headers
        )


class ModelNotFoundError(APIError):
    status_code = 404
    default_code = "model_not_found"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(APIError):
    status_code = 404


class ConflictError(APIError):
    status_code = 409


class BodyTooLargeError(APIError):
    status_code = 413
    default_code = "request_too_large"


class ServiceUnavailableError(APIError):
    """Loading, draining or stopped: the client should retry (another replica) later."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, code: str):
        super().__init__(message, code=code, headers={"Retry-After": str(RETRY_AFTER_UNAVAIL)})


class RequestTimeoutError(APIError):
    """The request ran past the server's `request_timeout_s` and was aborted."""

    status_code = 408
    error_type = "timeout_error"
    default_code = "request_timeout"


class GenerationError(APIError):
    """The engine failed a request (finish_reason "error"): the server's fault, not the input's."""

    status_code = 500
    error_type = "server_error"
    default_code = "generation_failed"


# ---- the table ---------------------------------------------------------------------------


def _engine(status: int, type_: str, code: str | None, retry_after: int | None = None):
    def build(exc: Exception) -> ErrorPayload:
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        message = str(exc) or type(exc).__name__
        return ErrorPayload(status, message, type_, getattr(exc, "param", None), code, headers)

    return build


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _field_path(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') → 'messages[0].content' (union tags dropped)."""
    out = ""
    for seg in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif seg in _TYPE_TAGS or "[" in seg or "-" in seg or seg[:1].isupper():
            continue  # a union member's tag, not a field
        else:
            out += f".{seg}" if out else seg
    return out or None


def _validation(exc: Exception) -> ErrorPayload:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if not errors:
        return ErrorPayload(400, "invalid request", "invalid_request_error")
    first = errors[0]
    param = _field_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        message = f"malformed JSON body: {detail}".rstrip(": ")
        return ErrorPayload(400, message, "invalid_request_error", code="invalid_json")
    if param is None:
        if kind == "missing":
            msg = "a JSON request body is required"
        elif kind in ("model_attributes_type", "dict_type", "model_type"):
            msg = (
                "the request body must be a JSON object, sent with 'Content-Type: application/json'"
            )
        return ErrorPayload(400, msg, "invalid_request_error", code=kind or None)
    message = f"{param}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ErrorPayload(400, message, "invalid_request_error", param, kind or None)


def _http(exc: Exception) -> ErrorPayload:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return ErrorPayload(status, message, type_, None, code, dict(exc.headers or {}))


def _api(exc: Exception) -> ErrorPayload:
    assert isinstance(exc, APIError)
    return exc.payload()


def _internal(exc: Exception) -> ErrorPayload:
    """A bug or an unexpected fault: the details go to the log under a fresh error id; the
    client gets that id and nothing of the exception."""
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s: %s", error_id, type(exc).__name__, exc_info=exc)
    message = f"internal server error (error id {error_id}; the details are in the server log)"
    return ErrorPayload(500, message, "server_error", code="internal_error")


ERROR_TABLE: dict[type[BaseException], Callable[[Exception], ErrorPayload]] = {
    APIError: _api,
    RequestValidationError: _validation,
    StarletteHTTPException: _http,
    ContextLengthExceededError: _engine(400, "invalid_request_error", "context_length_exceeded"),
    InvalidRequestError: _engine(400, "invalid_request_error", "invalid_value"),
    AgentLoadError: _engine(400, "invalid_request_error", "invalid_agent"),
    QueueFullError: _engine(429, "rate_limit_error", "queue_full", RETRY_AFTER_BUSY),
    EngineDeadError: _engine(503, "server_error", "engine_dead", RETRY_AFTER_UNAVAIL),
    EngineNotReadyError: _engine(503, "server_error", "engine_not_ready", RETRY_AFTER_UNAVAIL),
    RequestAbortedError: _engine(503, "server_error", "request_aborted", RETRY_AFTER_UNAVAIL),
    Exception: _internal,
}


def describe(exc: BaseException) -> ErrorPayload:
    """The payload of the first table row on `exc`'s MRO."""
    for cls in type(exc).__mro__:
        build = ERROR_TABLE.get(cls)
        if build is not None:
            return build(exc)  # type: ignore[arg-type]
    return _internal(Exception())


def _leaf_routes(routes: list[Any]) -> Iterator[Any]:
    """Routes, with included routers expanded (FastAPI ≥ 0.120 keeps them nested)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _leaf_routes(inner.routes) if inner is not None else (route,)


def _allowed_methods(request: Request, fallback: str) -> str:
    """Every method the request's path supports (RFC 9110: a 405 lists them in `Allow`).

    The router's own 405 names only the first route that matched the path, so a path served
    by two routes (PUT and DELETE /admin/agents/{name}) would advertise one of them."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.router.routes):
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods)) or fallback


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    payload = describe(exc)
    if payload.status_code == 405:
        allow = _allowed_methods(request, payload.headers.get("Allow", ""))
        payload = replace(payload, headers={**payload.headers, "Allow": allow})
    if payload.code == "internal_error":
        log.error("(the internal error above was on %s %s)", request.method, request.url.path)
    return payload.response()


def install_exception_handlers(app: FastAPI) -> None:
    for exc_type in ERROR_TABLE:
        app.add_exception_handler(exc_type, _handle)

"""The error object every non-2xx answer carries, and the `responses` that document it.

Wire shape (OpenAI's): `{"error": {"message", "type", "param", "code"}}`, built by
`server/errors.py` from one table. Routers pass `error_responses(...)` so /openapi.json lists
each status a route can answer with this schema (and `Retry-After` on 429/503), instead of
FastAPI's default 422, which this server never sends (validation errors are 400, as OpenAI's).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Error(BaseModel):
    message: str = Field(description="what went wrong, for a human")
    type: str = Field(description="invalid_request_error, authentication_error, server_error, …")
    param: str | None = Field(description="the request field at fault, if any")
    code: str | None = Field(description="a stable machine-readable code, if any")


class ErrorResponse(BaseModel):
    error: Error


_DESCRIPTIONS = {
    400: "invalid request (bad field, unsupported parameter, prompt beyond the context)",
    401: "missing or wrong key",
    403: "the admin API is disabled, or no agent directory is configured",
    404: "unknown model, agent or agent path",
    408: "the request ran past the server's request timeout and was stopped",
    409: "the name is taken by the base model",
    413: "request body too large",
    429: "the waiting queue is full: retry after `Retry-After` seconds",
    500: "the engine failed this request",
    503: "loading, draining or stopped: retry after `Retry-After` seconds",
    "4XX": "any other client error (e.g. 405 wrong method)",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (plus the 4XX catch-all)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in (*statuses, "4XX"):
        out[status] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out

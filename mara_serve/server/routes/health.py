"""Probes and metrics, open without credentials: /health (liveness), /ready, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mara_serve.server.errors import RETRY_AFTER_UNAVAIL
from mara_serve.server.metrics import CONTENT_TYPE
from mara_serve.server.protocol.health import ServerStatus
from mara_serve.server.routes.deps import State
from mara_serve.server.state import ServerState

router = APIRouter(tags=["ops"])

_UNHEALTHY = {503: {"model": ServerStatus, "description": "startup failed, or the engine died"}}
_NOT_READY = {
    503: {
        "model": ServerStatus,
        "description": "loading, draining or failed",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
    }
}
_METRICS = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


def _status(state: ServerState) -> dict[str, Any]:
    return {
        "phase": str(state.phase),
        "engine_alive": state.engine_alive(),
        "error": state.problem(),
        "in_flight": state.inflight.count,
    }


@router.get("/health", response_model=ServerStatus, responses=_UNHEALTHY)
async def health(state: State) -> JSONResponse:
    """Liveness: 200 while the process is healthy (also while loading); 503 when the model
    failed to load or the engine can no longer run it (restart the process)."""
    ok = state.is_live()
    return JSONResponse(
        {"status": "ok" if ok else "unhealthy", **_status(state)}, status_code=200 if ok else 503
    )


@router.get("/ready", response_model=ServerStatus, responses=_NOT_READY)
async def ready(state: State) -> JSONResponse:
    """Readiness: 200 only when the model and startup agents are loaded and the server is not
    draining; 503 with Retry-After otherwise."""
    if state.is_ready():
        return JSONResponse({"status": "ready", **_status(state)})
    return JSONResponse(
        {"status": "not_ready", **_status(state)},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_UNAVAIL)},
    )


@router.get("/metrics", response_class=PlainTextResponse, responses=_METRICS)
async def metrics(state: State) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

"""The app factory: `create_app(settings, engine=None)`.

Builds one FastAPI app with its own state, metrics registry and lifespan (no module-level app or
settings). Without an `engine` the lifespan loads the model from `settings` in the background;
tests inject a small engine. The app owns the engine from then on and shuts it down on exit.
For `uvicorn --factory mara_serve.server.app:app_from_env` there is `app_from_env()` (settings
from the environment); `mara serve` (server/process.py) adds graceful draining on SIGTERM.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

import mara_serve
from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.server.body_limit import BodySizeLimitMiddleware
from mara_serve.server.errors import install_exception_handlers
from mara_serve.server.lifecycle import lifespan_for
from mara_serve.server.metrics import ServerMetrics
from mara_serve.server.routes import admin, health, models, openai, tokenize, ui
from mara_serve.server.settings import Settings
from mara_serve.server.state import ServerState

PROBE_PATHS = {"liveness": "/health", "readiness": "/ready", "metrics": "/metrics"}


def create_app(settings: Settings | None = None, engine: AsyncEngine | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    state = ServerState(settings, ServerMetrics())
    app = FastAPI(
        title="MARA Serve",
        version=mara_serve.__version__,
        summary="OpenAI-compatible LLM server with MARA decoding-time alignment agents",
        lifespan=lifespan_for(state, engine),
    )
    app.state.mara = state
    install_exception_handlers(app)
    routers = (openai.router, models.router, tokenize.router, admin.router, health.router,
               ui.router)  # fmt: skip
    for router in routers:
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-Id"],
        )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """`uvicorn --factory mara_serve.server.app:app_from_env`: settings from MARA_* variables."""
    return create_app(Settings())

"""The server's lifecycle state: its phase, and the `Services` once the model is loaded.

Phases: loading → ready → draining → stopped, or failed (model or startup agents did not load).
/health is 200 unless failed or the engine died; /ready is 200 only while ready with a working
engine; the OpenAI routes answer 503 + Retry-After in every other case (`ready_services`). One
`ServerState` per app (in `app.state.mara`), built by `create_app` and advanced by the lifespan
(`lifecycle.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.errors import ENGINE_DEAD_MESSAGE
from mara_serve.server.errors import ServiceUnavailableError
from mara_serve.server.metrics import ServerMetrics
from mara_serve.server.services import Services
from mara_serve.server.serving.inflight import InflightRequests
from mara_serve.server.settings import Settings


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class ServerState:
    def __init__(self, settings: Settings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.error: str | None = None  # why startup failed
        self.started_at = int(time.time())
        self.inflight = InflightRequests()
        # The engine exists from the end of loading (drain and shutdown need it even when the
        # rest of startup failed); the services once startup completed.
        self.engine: AsyncEngine | None = None
        self.services: Services | None = None
        self.on_fatal: Callable[[], None] | None = None  # called when startup fails

    def engine_alive(self) -> bool:
        return self.engine is not None and self.engine.is_alive()

    def engine_dead(self) -> bool:
        """The engine found it can no longer run the model (restart the process)."""
        return self.engine is not None and self.engine.dead_reason is not None

    def problem(self) -> str | None:
        """What /health and /ready report as the error (never exception internals)."""
        if self.engine_dead():
            return ENGINE_DEAD_MESSAGE
        return self.error

    def is_live(self) -> bool:
        """Liveness: false only when restarting the process is the fix."""
        if self.phase == Phase.FAILED or self.engine_dead():
            return False
        return self.phase != Phase.READY or self.engine_alive()

    def is_ready(self) -> bool:
        return self.phase == Phase.READY and self.services is not None and self.engine_alive()

    def ready_services(self) -> Services:
        """The services while ready; else the 503 that explains why requests are not served."""
        services = self.services
        if services is not None and self.is_ready():
            return services
        if self.engine_dead():
            raise ServiceUnavailableError(ENGINE_DEAD_MESSAGE, "engine_dead")
        messages = {
            Phase.LOADING: ("the server is starting: the model is loading", "server_loading"),
            Phase.DRAINING: ("the server is shutting down", "server_draining"),
            Phase.STOPPED: ("the server is shutting down", "server_draining"),
            Phase.FAILED: (f"the server failed to start: {self.error}", "server_failed"),
        }
        message, code = messages.get(self.phase, ("the engine is not running", "engine_dead"))
        raise ServiceUnavailableError(message, code)

"""The server's lifecycle state: phase, loaded model and engine, and in-flight requests.

Phases: loading → ready → draining → stopped, or failed (model or startup agents did not load).
/health is 200 unless failed (or the engine thread died); /ready is 200 only while ready; the
OpenAI routes answer 503 + Retry-After in every other phase. One `ServerState` per app (in
`app.state.mara`), built by `create_app` and filled in by the lifespan (`lifecycle.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from server.errors import ServiceUnavailableError
from server.metrics import ServerMetrics
from server.settings import Settings

if TYPE_CHECKING:
    from mara_core.async_engine import AsyncEngine
    from mara_core.loading import LoadedModel
    from mara_core.registry import AgentRegistry
    from server.serving.agents import AgentAdmin
    from server.serving.chat import ChatServing
    from server.serving.completion import CompletionServing
    from server.serving.models import ServedModels


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class InflightRequests:
    """Generation requests admitted and not yet answered in full (what a drain waits for)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self) -> None:
        self.count += 1
        self._idle.clear()

    def done(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every request finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class ServerState:
    def __init__(self, settings: Settings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.started_at = int(time.time())
        self.inflight = InflightRequests()
        self.engine: AsyncEngine | None = None
        self.lm: LoadedModel | None = None
        self.registry: AgentRegistry | None = None
        self.models: ServedModels | None = None
        self.agents: AgentAdmin | None = None
        self.chat: ChatServing | None = None
        self.completions: CompletionServing | None = None
        self.on_fatal: Callable[[], None] | None = None  # called when startup fails

    def engine_alive(self) -> bool:
        return self.engine is not None and self.engine.is_alive()

    def is_live(self) -> bool:
        """Liveness: false only when restarting the process is the fix."""
        if self.phase == Phase.FAILED:
            return False
        return self.phase != Phase.READY or self.engine_alive()

    def is_ready(self) -> bool:
        return self.phase == Phase.READY and self.engine_alive()

    def require_ready(self) -> None:
        """Raise the 503 that explains why requests are not served now."""
        if self.is_ready():
            return
        messages = {
            Phase.LOADING: ("the server is starting: the model is loading", "server_loading"),
            Phase.DRAINING: ("the server is shutting down", "server_draining"),
            Phase.STOPPED: ("the server is shutting down", "server_draining"),
            Phase.FAILED: (f"the server failed to start: {self.error}", "server_failed"),
        }
        message, code = messages.get(self.phase, ("the engine is not running", "engine_dead"))
        raise ServiceUnavailableError(message, code)

"""Run the app in this process under uvicorn, draining on the first shutdown signal.

Shutdown: the first SIGTERM/SIGINT drains (new requests and /ready get 503 while the socket
stays open, running streams finish for up to `graceful_shutdown_s`), then uvicorn stops; a
second signal stops at once. `serve` returns the process exit status: 0 after a clean stop, 1 if
startup failed (the model or a startup agent did not load).
"""

from __future__ import annotations

import asyncio
import logging
import typing
from types import FrameType

import uvicorn

from mara_serve.server.app import create_app
from mara_serve.server.lifecycle import drain
from mara_serve.server.settings import Settings
from mara_serve.server.state import Phase

log = logging.getLogger("mara_serve.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain between the first shutdown signal and closing the socket."""

    def __init__(self, config: uvicorn.Config, state: typing.Any):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: typing.Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None or self.state.phase != Phase.READY:
            super().handle_exit(sig, frame)  # second signal, or nothing to drain: stop now
            return
        self._draining = True
        log.info("received signal %d: draining (a second signal stops at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state, self.state.settings.graceful_shutdown_s)
        finally:
            self.should_exit = True


def serve(settings: Settings) -> int:
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if unknown := Settings.unknown_env_vars():
        log.warning("ignoring unknown settings in the environment: %s", ", ".join(unknown))
    app = create_app(settings)
    state = app.state.mara
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, state)

    def stop_after_failure() -> None:
        server.should_exit = True

    state.on_fatal = stop_after_failure
    server.run()
    return 1 if state.phase == Phase.FAILED else 0

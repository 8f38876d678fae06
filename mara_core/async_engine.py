"""`AsyncEngine`: the engine on its own thread, with an asyncio face for the server.

The server's interface to the engine (DESIGN.md): `generate(request)` → async iterator of
`RequestOutput` deltas, `abort(id)`, `health()`, `stats()`. Torch never runs on the event loop:
one daemon thread owns the `LLMEngine` and steps it while there is work; outputs cross back to
the loop through per-request asyncio queues (`call_soon_threadsafe`). Cancelling the consuming
task (a client disconnect) aborts the request, which frees its slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from mara_core.engine import LLMEngine
from mara_core.errors import EngineNotReadyError, RequestAbortedError
from mara_core.request import Request, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self.step_listeners: list[Callable[[list[RequestOutput]], None]] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mara-engine", daemon=True)
            self._thread.start()

    def stop_accepting(self) -> None:
        self.engine.stop_accepting()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Stop admission, let in-flight requests finish for up to `timeout` s, then stop."""
        self.engine.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._streams_lock:
            ids = list(self._streams)
        for rid in ids:
            self.engine.abort(rid)
        self._wake.set()
        t_end = time.monotonic() + 5
        while self.engine.has_work() and time.monotonic() < t_end and self.is_alive():
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> dict:
        return {"engine_thread_alive": self.is_alive(), "error": self._error}

    def stats(self) -> dict:
        return self.engine.stats()

    # ---- requests -----------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit and stream deltas. Raises on invalid input or a full queue before any output."""
        if not self.is_alive():
            raise EngineNotReadyError("the engine is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request.request_id
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"duplicate request id {rid}")
            self._streams[rid] = (loop, queue)
        try:
            self.engine.add_request(request)
        except BaseException:
            with self._streams_lock:
                self._streams.pop(rid, None)
            raise
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(rid, None)
            if not finished:  # consumer went away (disconnect/cancel): free the slot
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    async def generate_all(self, request: Request) -> RequestOutput:
        """Run a request to completion; returns one output holding all tokens and traces."""
        ids, traces, last = [], [], None
        async for out in self.generate(request):
            ids += out.new_token_ids
            traces += out.traces
            last = out
        assert last is not None
        if last.finish_reason == "abort":
            raise RequestAbortedError(request.request_id)
        last.new_token_ids, last.traces = ids, traces
        return last

    # ---- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine isolates per-request faults; this is a last resort
                log.exception("engine step failed")
                self._error = f"{type(e).__name__}: {e}"
                self._fail_all(str(e))
                continue
            for listener in self.step_listeners:
                try:
                    listener(outputs)
                except Exception:
                    log.exception("step listener failed")
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._streams_lock:
            targets = [(self._streams.get(o.request_id), o) for o in outputs]
        for target, out in targets:
            if target is None:
                continue
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the loop is closed (server stopping)
                pass

    def _fail_all(self, message: str) -> None:
        for seq in list(self.engine.running):
            self.engine.abort(seq.request_id)
        with self._streams_lock:
            targets = list(self._streams.items())
        for rid, (loop, queue) in targets:
            out = RequestOutput(rid, [], [], True, "error", message)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:
                pass

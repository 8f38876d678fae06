"""`AsyncEngine`: the engine on its own thread, with an asyncio face for the server.

The interface (vLLM's `AsyncLLM` is the model):

- `add_requests(requests)` validates and queues synchronously, all or none, and raises at once
  (invalid input, a full queue, a stopped or dead engine); it returns one `RequestStream`, the
  single collector of those requests' outputs (the choices of one API request).
- `RequestStream.get()` waits for the outputs delivered since the last call; the stream owns
  `abort()` (one request or all) and `close()`.
- `health()`, `stats()`, `shutdown()`.

Torch never runs on the event loop: one daemon thread owns the `LLMEngine` and steps it while
there is work. It is the process's only torch thread: `launch(build)` loads the model on it and
`run(fn)` runs other torch work (loading an agent) on it between steps. With OpenMP (torch's CPU
thread pool) every thread that runs a parallel op keeps its own worker team; once two teams
exist the CPU is oversubscribed and libgomp stops spinning between parallel regions, so every
matmul waits for its workers to wake — measured on a 2-core VM, an engine stepping on one thread
after the model was loaded on another (still alive) ran at 67 ms per token instead of 35.

After each step the engine thread hands that step's outputs to each event loop in ONE
`call_soon_threadsafe` call; on the loop they go straight into their stream's pending list. So a
token crosses one queue between the engine and the code that encodes it for the client. Tokens
known before a step's forward (plain rows sample theirs from the previous forward's logits) are
handed off before the forward, in one more call: the first token of a plain request leaves right
after its prefill.

Faults: the engine isolates a request's own fault (its agent, its input) and fails only that
request. A step that raises anyway is checked with `LLMEngine.self_check`: if the model still
runs, the running requests end with an error and waiting ones stay queued (decoded normally
later); if it does not (e.g. a device error on every forward), the engine is dead — every
request ends with `EngineDeadError`, new ones are refused with it, `health()` reports it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from mara_serve.engine.engine import LLMEngine
from mara_serve.engine.errors import (
    ENGINE_DEAD_MESSAGE,
    EngineDeadError,
    EngineNotReadyError,
    RequestAbortedError,
)
from mara_serve.engine.request import Request, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestStream:
    """The outputs of requests submitted together, collected on one event loop.

    Built by `AsyncEngine.add_requests`. Every method runs on the stream's event loop; the
    engine thread reaches it only through `loop.call_soon_threadsafe`.
    """

    def __init__(
        self, engine: AsyncEngine, request_ids: list[str], loop: asyncio.AbstractEventLoop
    ):
        self.request_ids = list(request_ids)
        self.loop = loop
        self._engine = engine
        self._unfinished = set(request_ids)
        self._pending: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self._closed = False

    @property
    def finished(self) -> bool:
        """Every request has delivered its finished output (or the stream was closed)."""
        return not self._unfinished or self._closed

    def _put(self, outputs: list[RequestOutput]) -> None:
        if self._closed or self._error is not None:
            return  # nobody reads on, or the stream already ended with its error
        for out in outputs:
            if out.request_id not in self._unfinished:
                continue  # aborted by the consumer: nobody reads it any more
            if out.finished:
                self._unfinished.discard(out.request_id)
            self._pending.append(out)
        self._wake.set()
        if not self._unfinished:
            self._engine._unregister(self)

    def fail(self, error: BaseException) -> None:
        """End the stream with `error`: `get()` raises it once the outputs before it are read
        (an engine failure, or the server's own deadline)."""
        if self._closed or self._error is not None:
            return
        self._error = error
        self._wake.set()

    async def get(self) -> list[RequestOutput]:
        """The outputs delivered since the last call, in order (waits for at least one).
        Raises the stream's error after the last output before it; [] once finished."""
        while not self._pending:
            if self._error is not None:
                raise self._error
            if self.finished:
                return []
            self._wake.clear()
            await self._wake.wait()
        outputs, self._pending = self._pending, []
        return outputs

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while batch := await self.get():
            for out in batch:
                yield out

    def abort(self, request_id: str | None = None) -> None:
        """Abort one request (e.g. its stop string matched) or every unfinished one; their
        later outputs are dropped. The engine frees their slots at the next step boundary."""
        ids = [request_id] if request_id is not None else list(self._unfinished)
        for rid in ids:
            if rid in self._unfinished:
                self._unfinished.discard(rid)
                self._engine.abort(rid)
        if not self._unfinished:
            self._engine._unregister(self)

    def close(self) -> None:
        """Abort what still runs and release the stream (idempotent)."""
        if self._closed:
            return
        self.abort()
        self._closed = True
        self._engine._unregister(self)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        # Tokens decided before a step's forward (a plain row's sampled token) reach their
        # streams before the forward runs, not after it (engine.py `_plan`).
        engine.on_decided = self._deliver
        self._streams: dict[str, RequestStream] = {}  # request id → its stream
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._dead: str | None = None  # why the engine died; None while it works
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # run() on the thread
        self._calls_lock = threading.Lock()
        self._calls_closed = False  # the thread has left its loop: run() refuses

    # ---- lifecycle ----------------------------------------------------------------------

    @classmethod
    def launch(cls, build: Callable[[], LLMEngine]) -> AsyncEngine:
        """Start the engine thread, build the engine ON it (`build` loads the model) and return
        once it runs; raises what `build` raised. Blocking: call it off the event loop."""
        built: Future = Future()

        def main() -> None:
            try:
                engine = cls(build())
            except BaseException as e:
                built.set_exception(e)
                return
            engine._thread = threading.current_thread()
            built.set_result(engine)
            engine._loop()

        threading.Thread(target=main, name="mara-engine", daemon=True).start()
        return built.result()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mara-engine", daemon=True)
            self._thread.start()

    def run(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` on the engine thread between two steps and return its result (or raise
        its exception). Blocking: call it off the event loop. Torch work outside the engine's
        own steps (loading an agent) goes through here, so the process keeps one torch thread."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._calls_lock:
            if self._thread is None or self._calls_closed:
                raise EngineNotReadyError("the engine is not running")
            self._calls.append((fn, future))
        self._wake.set()
        return future.result(timeout)

    def stop_accepting(self) -> None:
        self.engine.stop_accepting()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Stop admission, let in-flight requests finish for up to `timeout` s, then stop."""
        self.engine.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.engine.has_work() and time.monotonic() < deadline and self.is_alive():
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
        """The engine thread runs and the engine can still run the model."""
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def health(self) -> dict[str, Any]:
        thread = self._thread is not None and self._thread.is_alive()
        return {"engine_thread_alive": thread, "engine_dead": self._dead}

    def stats(self) -> dict:
        return self.engine.stats()

    # ---- requests (on the event loop) ---------------------------------------------------

    def add_requests(self, requests: list[Request]) -> RequestStream:
        """Queue `requests` all or none and return their stream; raises at once if they are
        refused (InvalidRequestError, QueueFullError, EngineNotReadyError, EngineDeadError)."""
        if self._dead is not None:
            raise EngineDeadError(ENGINE_DEAD_MESSAGE)
        if not self.is_alive():
            raise EngineNotReadyError("the engine is not running")
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate request ids")
        stream = RequestStream(self, ids, asyncio.get_running_loop())
        with self._streams_lock:
            if any(rid in self._streams for rid in ids):
                raise ValueError("duplicate request id")
            for rid in ids:
                self._streams[rid] = stream
        try:
            self.engine.add_requests(requests)
        except BaseException:
            self._unregister(stream)
            raise
        self._wake.set()
        return stream

    def add_request(self, request: Request) -> RequestStream:
        return self.add_requests([request])

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _unregister(self, stream: RequestStream) -> None:
        with self._streams_lock:
            for rid in stream.request_ids:
                if self._streams.get(rid) is stream:
                    del self._streams[rid]

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Submit one request and iterate its outputs (aborted if the consumer leaves early)."""
        stream = self.add_request(request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

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

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # nobody runs the calls any more: fail them rather than leave callers waiting
            with self._calls_lock:
                self._calls_closed = True
            while self._calls:
                _, future = self._calls.popleft()
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineNotReadyError("the engine stopped"))

    def _serve(self) -> None:
        while not self._stop:
            self._run_calls()
            if self._dead is not None or not self.engine.has_work():  # a dead engine idles
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                log.exception("engine step failed")
                self._recover(e)
                continue
            self._deliver(outputs)

    def _recover(self, error: Exception) -> None:
        """A step raised: fail what it was running, or, if the model no longer runs, die."""
        if not isinstance(error, EngineDeadError) and self.engine.self_check():
            self._deliver(self.engine.fail_running(f"engine step failed: {type(error).__name__}"))
            self._fail_lost()
            return
        self._dead = f"{type(error).__name__}: {error}"
        log.critical("the engine is dead (%s): failing every request", self._dead)
        self.engine.fail_all()
        self._fail_streams(lambda: EngineDeadError(
            "the inference engine failed while generating this response; the server must be "
            "restarted"
        ))  # fmt: skip

    def _fail_lost(self) -> None:
        """Streams whose requests the engine no longer holds and never finished (they were
        between queues when the step raised) end with an error instead of waiting forever."""
        held = self.engine.request_ids()
        with self._streams_lock:
            lost = {s for rid, s in self._streams.items() if rid not in held}
        if lost:
            self._fail_streams(
                lambda: EngineNotReadyError("the engine failed to schedule this request"), lost
            )

    def _fail_streams(self, make_error, streams: set[RequestStream] | None = None) -> None:
        with self._streams_lock:
            targets = set(self._streams.values()) if streams is None else streams
        for stream in targets:
            try:
                stream.loop.call_soon_threadsafe(stream.fail, make_error())
            except RuntimeError:  # the loop is closed (server stopping)
                pass

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One hand-off per event loop per step: each stream gets its outputs in order."""
        if not outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, dict[RequestStream, list[RequestOutput]]] = {}
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, {}).setdefault(stream, []).append(out)
        for loop, batches in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, batches)
            except RuntimeError:  # the loop is closed (server stopping)
                pass


def _dispatch(batches: dict[RequestStream, list[RequestOutput]]) -> None:
    for stream, outputs in batches.items():
        stream._put(outputs)

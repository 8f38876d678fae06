"""Helpers the reliability tests share: waiting, and streams held open in background threads."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

BASE = "tiny-llama"


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(interval)
    return time.monotonic() - start


def stream_text(live: Any, body: dict[str, Any]) -> tuple[str, list[Any]]:
    """A streaming chat request read to the end: (its text, the decoded events)."""
    events = live.sse("/v1/chat/completions", {**body, "stream": True})
    text = "".join(
        c["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and "choices" in e
        for c in e["choices"]
    )
    return text, events


class OpenStream:
    """A streaming request read in a background thread, so a test holds many at once."""

    def __init__(self, live: Any, body: dict[str, Any]):
        self.lines: list[str] = []
        self.status: int | None = None
        self.request_id: str | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._socket: socket.socket | None = None
        self._client = httpx.Client(timeout=60)
        req = self._client.build_request(
            "POST", live.base_url + "/v1/chat/completions", headers=live.auth,
            json={**body, "stream": True},
        )  # fmt: skip
        self._thread = threading.Thread(target=self._read, args=(req,), daemon=True)
        self._thread.start()

    def _read(self, req: httpx.Request) -> None:
        try:
            r = self._client.send(req, stream=True)
            self._socket = r.extensions["network_stream"].get_extra_info("socket")
            self.status, self.request_id = r.status_code, r.headers.get("x-request-id")
            try:
                for line in r.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        self.started.set()  # the first token arrived: it is running
                    if line:
                        self.lines.append(line)
            finally:
                r.close()
        except (httpx.HTTPError, RuntimeError) as e:  # closed by the test: a disconnect
            self.error = e
        finally:
            self.started.set()

    def close(self) -> None:
        """Drop the connection mid-stream (a client that goes away). The socket is shut down,
        not just closed: a close() from this thread neither wakes the reader blocked in recv()
        nor sends the FIN while it is blocked, so a queued stream would seem to stay."""
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._client.close()

    def join(self, timeout: float = 60) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not finish"

    def text(self) -> str:
        out = []
        for line in self.lines:
            data = line.removeprefix("data: ")
            if data.startswith("{") and '"choices"' in data:
                for c in json.loads(data)["choices"]:
                    out.append(c["delta"].get("content") or "")
        return "".join(out)

    def errors(self) -> list[dict[str, Any]]:
        return [
            json.loads(line[6:])["error"]
            for line in self.lines
            if line.startswith('data: {"error"')
        ]


@contextlib.contextmanager
def slow_engine(live: Any, step_s: float = 0.02) -> Iterator[threading.Event]:
    """Each engine step of `live` takes at least `step_s`, so streams outlast what a test does
    meanwhile on any machine; clearing the yielded event holds the engine before its next step.
    On exit the engine runs at full speed again and the test waits until it is idle."""
    engine = live.state.engine.engine
    real_step = engine.step
    gate = threading.Event()
    gate.set()

    def slow_step() -> Any:
        gate.wait()
        time.sleep(step_s)
        return real_step()

    engine.step = slow_step
    try:
        yield gate
    finally:
        gate.set()
        del engine.step  # back to the class's method
        wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0, 10)


def engine_ids(live: Any) -> set[str]:
    """Request ids in the engine's running batch (HTTP request id + "-<choice>")."""
    return {seq.request_id for seq in list(live.state.engine.engine.running)}


def waiting_ids(live: Any) -> set[str]:
    """Request ids in the engine's waiting queue."""
    return {request.request_id for request in list(live.state.engine.engine._waiting)}

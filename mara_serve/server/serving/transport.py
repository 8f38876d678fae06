"""HTTP transport of generations: SSE framing, keep-alives and client-disconnect handling.

`SSEResponse` always listens for the client going away while it streams (Starlette's
`StreamingResponse` stops listening under ASGI spec 2.4 and only notices on the next write, which
never comes while a request waits in the queue); on disconnect the body generator is cancelled,
and `on_close` runs whatever happened, even if the body never started. `cancel_on_disconnect`
does the same for non-streaming requests. Either way the engine request is aborted, so a client
that leaves frees its batch slot within one engine step.

While a stream has nothing to send (queued behind a full batch) it sends an SSE comment every
`heartbeat_s` seconds, so proxies and load balancers do not cut an idle connection; clients
ignore comment lines (SSE spec).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from mara_serve.server.errors import describe

log = logging.getLogger(__name__)
T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


def sse_event(payload: str | dict[str, Any]) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def error_event(request_id: str, exc: Exception) -> bytes:
    """The in-band error of a stream that already started (then `[DONE]` follows)."""
    payload = describe(exc)  # an internal error is logged there, under its error id
    if payload.status_code >= 500:
        log.warning("stream %s ended with %s (%s)", request_id, payload.code, type(exc).__name__)
    return sse_event(payload.body())


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"
    heartbeat_s = 15.0

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ):
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.on_close()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})  # fmt: skip
        chunks = aiter(self.body_iterator)
        # Each chunk is awaited in a task so waiting can time out into a keep-alive without
        # cancelling the generator; cancelling this coroutine cancels the pending task, which
        # raises CancelledError inside the generator (its cleanup runs).
        pending = asyncio.ensure_future(anext(chunks))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self.heartbeat_s)
                if not done:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n",
                                "more_body": True})  # fmt: skip
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                pending = asyncio.ensure_future(anext(chunks))
        finally:
            pending.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it if the client disconnects first (then returns a 499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return JSONResponse(
            {
                "error": {
                    "message": "client disconnected",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=499,
        )
    return task.result()


async def json_response(
    request: Request, work: Awaitable[BaseModel], headers: dict[str, str]
) -> Response:
    """A non-streaming answer; the generation is cancelled if the client leaves first."""
    result = await cancel_on_disconnect(request, work)
    if isinstance(result, Response):
        return result
    return Response(result.model_dump_json(), media_type="application/json", headers=headers)

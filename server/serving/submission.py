"""Admission of one engine request, separated from waiting for its tokens.

`AsyncEngine.generate` is an async generator: it queues the request (raising QueueFullError,
InvalidRequestError, EngineNotReadyError, ...) when first advanced, then waits for tokens. A
server must know the admission outcome *before* it commits to a 200 streaming response, but must
not wait for the first token to know it. `admit` starts the generator in a task and yields to
the loop once: a new task runs its first step ahead of this coroutine's continuation (the
loop's ready queue is FIFO), and that step runs `generate` synchronously up to its first
`await` — past `add_request`. So afterwards the task has either failed (re-raised here, before
any response is sent) or the request is queued.

The returned `EngineStream` yields the outputs; closing it (or cancelling its consumer) before
the end aborts the engine request, which frees its slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from mara_core.async_engine import AsyncEngine
from mara_core.request import Request, RequestOutput


class EngineStream:
    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        outputs: AsyncGenerator[RequestOutput, None],
        first: asyncio.Future,
    ):
        self._engine = engine
        self._request_id = request_id
        self._outputs = outputs
        self._first = first
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        out = await self._first
        self._finished = out.finished
        yield out
        if out.finished:
            return
        async for out in self._outputs:
            self._finished = out.finished
            yield out

    def abort(self) -> None:
        """Abort the request now, without awaiting (for cleanup that may itself be cancelled)."""
        if not self._finished:
            self._engine.abort(self._request_id)
        self._first.cancel()

    async def aclose(self) -> None:
        """Abort the request if it is still running, and release the stream (idempotent)."""
        if not self._first.done():
            self._first.cancel()  # CancelledError inside generate(): its finally aborts
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._first
        await self._outputs.aclose()


async def admit(engine: AsyncEngine, request: Request) -> EngineStream:
    """Queue `request` in the engine; raises its admission error, else returns its stream."""
    outputs = engine.generate(request)
    first = asyncio.ensure_future(anext(outputs))
    await asyncio.sleep(0)  # let the task run generate() up to add_request (see module doc)
    if first.done() and first.exception() is not None:
        raise first.exception()  # type: ignore[misc]
    return EngineStream(engine, request.request_id, outputs, first)

"""One HTTP generation request: its choices, admitted together and streamed as merged deltas.

`ChoiceState` is one choice's text pipeline (ids → detokenizer → stop strings → text delta).
`Generation` admits every choice's engine request (all or none: if one is refused, the admitted
ones are aborted and the error is raised before any response starts), then `deltas()` merges
the choices' outputs in arrival order. A choice that hits a stop string is finished at once and
its engine request aborted. With a timeout, `deltas()` raises `RequestTimeoutError` once the
deadline (admission + timeout) passes. `aclose()` aborts whatever still runs (client
disconnect, error, timeout), records the request's metrics and leaves the in-flight set; it is
idempotent, and every path that creates a `Generation` calls it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mara_core.async_engine import AsyncEngine
from mara_core.errors import RequestAbortedError
from mara_core.request import Request, RequestOutput, TokenTrace
from server.errors import GenerationError, RequestTimeoutError
from server.metrics import RequestTracker
from server.serving.detokenizer import IncrementalDetokenizer
from server.serving.stop import StopStringMatcher
from server.serving.submission import EngineStream, admit
from server.state import InflightRequests

log = logging.getLogger(__name__)


@dataclass
class ChoiceDelta:
    index: int
    text: str
    traces: list[TokenTrace]
    finish_reason: str | None  # "stop" | "length" on the choice's last delta


class ChoiceState:
    """Engine outputs of one choice → text deltas. Raises on an engine error or abort."""

    def __init__(self, index: int, request: Request, tokenizer: Any, stops: list[str]):
        self.index = index
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self.stops = StopStringMatcher(stops) if stops else None
        self.num_generated_tokens = 0
        self.finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def consume(self, out: RequestOutput) -> ChoiceDelta:
        if out.finished and out.finish_reason == "error":
            raise GenerationError(f"generation failed: {out.error or 'engine error'}")
        if out.finished and out.finish_reason == "abort":
            raise RequestAbortedError("the request was aborted (the server is shutting down)")
        ids = out.new_token_ids
        if out.finished and out.finish_reason == "stop" and ids:
            ids = ids[:-1]  # the EOS / stop token ends the text; it is not part of it
        self.num_generated_tokens = out.num_generated_tokens
        text = self.detokenizer.push(ids)
        if out.finished:
            text += self.detokenizer.flush()
        hit = False
        if self.stops is not None:
            text, hit = self.stops.push(text)
            if out.finished and not hit:
                text += self.stops.flush()
        if hit:
            self.finish_reason = "stop"
        elif out.finished:
            self.finish_reason = out.finish_reason
        return ChoiceDelta(self.index, text, out.traces, self.finish_reason)


class Generation:
    def __init__(
        self,
        request_id: str,
        choices: list[ChoiceState],
        tracker: RequestTracker,
        inflight: InflightRequests,
        timeout_s: float | None = None,
    ):
        self.request_id = request_id
        self.choices = choices
        self.tracker = tracker
        self.inflight = inflight
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        self.status = "aborted"  # until marked otherwise
        self._streams: list[EngineStream] = []
        self._pumps: list[asyncio.Task] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @classmethod
    async def start(
        cls,
        engine: AsyncEngine,
        request_id: str,
        choices: list[ChoiceState],
        tracker: RequestTracker,
        inflight: InflightRequests,
        timeout_s: float | None = None,
    ) -> Generation:
        gen = cls(request_id, choices, tracker, inflight, timeout_s)
        try:
            for choice in choices:
                gen._streams.append(await admit(engine, choice.request))
        except BaseException:
            gen.status = "rejected"
            await gen.aclose()
            raise
        inflight.add()
        prompts = {id(c.request.prompt_token_ids): c.num_prompt_tokens for c in choices}
        tracker.admitted(sum(prompts.values()))
        return gen

    def usage(self) -> dict[str, int]:
        prompts = {id(c.request.prompt_token_ids): c.num_prompt_tokens for c in self.choices}
        prompt = sum(prompts.values())
        completion = sum(c.num_generated_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas, merged in arrival order, until all choices finished."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._pumps = [
            asyncio.create_task(self._pump(i, s, queue)) for i, s in enumerate(self._streams)
        ]
        # The deadline arrives as a queue item (index -1), not as a cancellation: each chunk of
        # a stream is awaited in its own task (transport.py), so a cancel scope around this
        # generator would not hold, and a cancelled get() could lose an output.
        if self.deadline is not None:
            timeout = RequestTimeoutError(
                f"the request took longer than the server's limit of {self.timeout_s:g} s "
                "(queueing included) and was stopped; lower max_tokens or retry later"
            )
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self.deadline, queue.put_nowait, (-1, timeout))
        remaining = len(self.choices)
        while remaining:
            i, item = await queue.get()
            if i < 0:
                log.info("request %s: timed out after %g s", self.request_id, self.timeout_s)
                raise item  # type: ignore[misc]
            choice = self.choices[i]
            if choice.finish_reason is not None:
                continue  # finished by a stop string; outputs already in flight are dropped
            if isinstance(item, BaseException):
                raise item
            delta = choice.consume(item)
            self.tracker.on_output(i, item)
            if delta.finish_reason is not None:
                remaining -= 1
                if not item.finished:
                    self._pumps[i].cancel()  # stop string: abort the engine request now
            yield delta

    @staticmethod
    async def _pump(i: int, stream: EngineStream, queue: asyncio.Queue) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # surfaced by deltas()
            queue.put_nowait((i, e))
        finally:
            await stream.aclose()

    def mark(self, status: str) -> None:
        self.status = status

    def mark_failed(self, exc: BaseException) -> None:
        stopped = isinstance(exc, RequestAbortedError | RequestTimeoutError)
        self.status = "aborted" if stopped else "error"

    async def collect(self) -> list[tuple[str, list[TokenTrace], str]]:
        """Run to the end; per choice (text, traces, finish_reason)."""
        texts: list[list[str]] = [[] for _ in self.choices]
        traces: list[list[TokenTrace]] = [[] for _ in self.choices]
        try:
            async for d in self.deltas():
                texts[d.index].append(d.text)
                traces[d.index] += d.traces
        except Exception as e:
            self.mark_failed(e)
            raise
        self.mark("success")
        return [
            ("".join(t), tr, c.finish_reason or "stop")
            for t, tr, c in zip(texts, traces, self.choices, strict=True)
        ]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Everything that matters happens before the first await: a disconnect cancels the
        # stream's cancel scope, and anyio re-cancels every await inside it.
        if self._timer is not None:
            self._timer.cancel()
        for task in self._pumps:
            task.cancel()
        for stream in self._streams:
            stream.abort()
        self.tracker.finish(self.status)
        if self.status != "rejected":
            self.inflight.done()
        if self._pumps:  # each pump closes its own stream
            await asyncio.gather(*self._pumps, return_exceptions=True)
        else:
            for stream in self._streams:
                await stream.aclose()

"""One HTTP generation request: its choices, admitted together and streamed as merged deltas.

`ChoiceState` is one choice's text pipeline (ids → detokenizer → stop strings → text delta).
`Generation.start` queues every choice's engine request synchronously, all or none (a refusal
raises before any response starts), and gets back ONE `RequestStream` collecting all of them:
`deltas()` reads it directly, so a token passes through that one queue between the engine and
the SSE encoder. A choice that hits a stop string is finished at once and its engine request
aborted. With a timeout, `deltas()` raises `RequestTimeoutError` once the deadline (admission +
timeout) passes. `aclose()` aborts whatever still runs (client disconnect, error, timeout),
records the request's metrics and leaves the in-flight set; it is idempotent, and every path
that creates a `Generation` calls it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from mara_serve.engine.async_engine import AsyncEngine, RequestStream
from mara_serve.engine.errors import RequestAbortedError
from mara_serve.engine.request import Request, RequestOutput, TokenTrace
from mara_serve.server.errors import GenerationError, RequestTimeoutError
from mara_serve.server.metrics import RequestTracker
from mara_serve.server.serving.detokenizer import IncrementalDetokenizer
from mara_serve.server.serving.inflight import InflightRequests
from mara_serve.server.serving.stop import StopStringMatcher

log = logging.getLogger(__name__)


@dataclass
class ChoiceDelta:
    index: int
    text: str
    traces: list[TokenTrace]  # every token of the delta (mara_trace), the final EOS included
    finish_reason: str | None  # "stop" | "length" on the choice's last delta
    text_traces: list[TokenTrace]  # the tokens that belong to the text (logprobs)


class ChoiceResult(NamedTuple):
    """One choice of a non-streamed response."""

    text: str
    traces: list[TokenTrace]
    finish_reason: str
    text_traces: list[TokenTrace]


class ChoiceState:
    """Engine outputs of one choice → text deltas. Raises on an engine error or abort."""

    def __init__(
        self, index: int, request: Request, tokenizer: Any, stops: list[str],
        include_stop: bool = False, skip_special_tokens: bool = True,
    ):  # fmt: skip
        self.index = index
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                                  skip_special_tokens)  # fmt: skip
        self.stops = StopStringMatcher(stops, include_stop) if stops else None
        self.num_generated_tokens = 0
        self.finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def consume(self, out: RequestOutput) -> ChoiceDelta:
        if out.finished and out.finish_reason == "error":
            # The engine's error text is for the log, never the client (it may name devices,
            # files or internals): the client gets the request id to quote.
            rid = self.request.request_id
            log.error("request %s failed in the engine: %s", rid, out.error or "engine error")
            raise GenerationError(
                f"the server failed while generating this response (request id {rid}); "
                "the error was logged"
            )
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
        return ChoiceDelta(self.index, text, out.traces, self.finish_reason,
                           out.traces[: len(ids)])  # fmt: skip


class Generation:
    def __init__(
        self,
        request_id: str,
        choices: list[ChoiceState],
        stream: RequestStream,
        tracker: RequestTracker,
        inflight: InflightRequests,
        timeout_s: float | None = None,
    ):
        self.request_id = request_id
        self.choices = choices
        self.tracker = tracker
        self.inflight = inflight
        self.timeout_s = timeout_s
        self.status = "aborted"  # until marked otherwise
        self._stream = stream
        self._index = {c.request.request_id: i for i, c in enumerate(choices)}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        if timeout_s is not None:
            # The deadline ends the stream like an engine error would: no task is cancelled,
            # so no output can be lost between the engine and the client.
            timeout = RequestTimeoutError(
                f"the request took longer than the server's limit of {timeout_s:g} s "
                "(queueing included) and was stopped; lower max_tokens or retry later"
            )
            self._timer = asyncio.get_running_loop().call_later(timeout_s, stream.fail, timeout)

    @classmethod
    def start(
        cls,
        engine: AsyncEngine,
        request_id: str,
        choices: list[ChoiceState],
        tracker: RequestTracker,
        inflight: InflightRequests,
        timeout_s: float | None = None,
    ) -> Generation:
        """Queue every choice, all or none; raises the admission error before any response."""
        stream = engine.add_requests([c.request for c in choices])
        gen = cls(request_id, choices, stream, tracker, inflight, timeout_s)
        inflight.add()
        tracker.admitted(gen.num_prompt_tokens)
        return gen

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens of the request: choices of one prompt share it (counted once)."""
        prompts = {id(c.request.prompt_token_ids): c.num_prompt_tokens for c in self.choices}
        return sum(prompts.values())

    def usage(self) -> dict[str, int]:
        prompt = self.num_prompt_tokens
        completion = sum(c.num_generated_tokens for c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas, in the order the engine produced them, until all choices
        finished. Raises the first failure (an engine error, abort or the deadline)."""
        stream = self._stream
        try:
            async for out in stream:
                i = self._index[out.request_id]
                choice = self.choices[i]
                if choice.finish_reason is not None:
                    continue  # ended by a stop string; outputs already delivered are dropped
                delta = choice.consume(out)
                self.tracker.on_output(i, out)
                if delta.finish_reason is not None and not out.finished:
                    stream.abort(out.request_id)  # a stop string matched: stop decoding it
                yield delta
        except RequestTimeoutError:
            log.info("request %s: timed out after %g s", self.request_id, self.timeout_s)
            raise

    def mark(self, status: str) -> None:
        self.status = status

    def mark_failed(self, exc: BaseException) -> None:
        stopped = isinstance(exc, RequestAbortedError | RequestTimeoutError)
        self.status = "aborted" if stopped else "error"

    async def collect(self) -> list[ChoiceResult]:
        """Run to the end; per choice (text, traces, finish_reason, text_traces)."""
        texts: list[list[str]] = [[] for _ in self.choices]
        traces: list[list[TokenTrace]] = [[] for _ in self.choices]
        text_traces: list[list[TokenTrace]] = [[] for _ in self.choices]
        try:
            async for d in self.deltas():
                texts[d.index].append(d.text)
                traces[d.index] += d.traces
                text_traces[d.index] += d.text_traces
        except Exception as e:
            self.mark_failed(e)
            raise
        self.mark("success")
        return [
            ChoiceResult("".join(t), tr, c.finish_reason or "stop", tt)
            for t, tr, c, tt in zip(texts, traces, self.choices, text_traces, strict=True)
        ]

    async def aclose(self) -> None:
        """Abort what still runs, record the request's metrics, leave the in-flight set.
        Synchronous inside (a disconnect may cancel the caller at its first await)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._stream.close()
        self.tracker.finish(self.status)
        self.inflight.done()

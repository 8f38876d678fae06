"""The frame /v1/chat/completions and /v1/completions share.

`admit` resolves the model, builds every choice and queues them as one `Generation`; anything
that fails before that counts the request as rejected (→ 4xx/429/503, no response started).
`respond` answers in full (JSON) or as an SSE stream; the stream frame is the same for both
endpoints: opening chunks, one or two chunks per engine delta (text, then the finish), the
usage chunk with `choices: []` when `stream_options.include_usage`, and `data: [DONE]`. An error
after the 200 went out is sent in-band as `data: {"error": {...}}`, then `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from mara_serve.engine.registry import AgentEntry
from mara_serve.engine.request import TokenTrace
from mara_serve.server.errors import APIError
from mara_serve.server.protocol.common import SamplingRequest, UsageInfo
from mara_serve.server.serving.context import ServingContext
from mara_serve.server.serving.generation import (
    ChoiceDelta,
    ChoiceResult,
    ChoiceState,
    Generation,
)
from mara_serve.server.serving.transport import DONE, SSEResponse, error_event, json_response

Results = list[ChoiceResult]
ChunkFn = Callable[[list[Any], UsageInfo | None], bytes]


class EndpointServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def admit(
        self,
        body: SamplingRequest,
        id_prefix: str,
        build_choices: Callable[[str, AgentEntry | None], Awaitable[list[ChoiceState]]],
    ) -> Generation:
        """Resolve `body.model`, build the choices (`build_choices(request_id, agent)`) and
        queue them; raises before any response is sent."""
        ctx = self.ctx
        agent = ctx.resolve_model(body)
        tracker = ctx.tracker(agent)
        try:
            request_id = f"{id_prefix}-{uuid.uuid4().hex}"
            choices = await build_choices(request_id, agent)
            return Generation.start(
                ctx.engine, request_id, choices, tracker, ctx.inflight,
                ctx.settings.request_timeout_s,
            )  # fmt: skip
        except BaseException:
            tracker.finish("rejected")
            raise

    async def prompt_rows(self, gen: Generation, k: int | None) -> list[Any]:
        """Each choice's prompt logprobs with `k` alternatives (ServingContext.
        prompt_logprob_rows; once per distinct prompt), or Nones when `k` is None. A failure
        aborts the admitted generation before any response."""
        if k is None:
            return [None] * len(gen.choices)
        done: dict[tuple[int, ...], Any] = {}
        try:
            for c in gen.choices:
                ids = tuple(c.request.prompt_token_ids)
                if ids not in done:
                    done[ids] = await self.ctx.prompt_logprob_rows(list(ids), k)
        except BaseException:
            await gen.aclose()
            raise
        return [done[tuple(c.request.prompt_token_ids)] for c in gen.choices]

    def render_traces(self, body: SamplingRequest, traces: list[TokenTrace]) -> Any:
        return self.ctx.traces.render(traces) if body.mara_trace else None

    async def respond(
        self,
        raw: Request,
        gen: Generation,
        stream: bool,
        full: Callable[[Results, int], BaseModel],
        events: Callable[[int], AsyncIterator[bytes]],
    ) -> Response:
        """`full(results, created)` builds the JSON answer; `events(created)` the SSE body."""
        headers = {"X-Request-Id": gen.request_id}
        created = int(time.time())
        if stream:
            return SSEResponse(events(created), gen.aclose, headers)

        async def collect() -> BaseModel:
            try:
                results = await gen.collect()
            except APIError as e:  # the error response names the request too
                e.headers = {**e.headers, **headers}
                raise
            finally:
                await gen.aclose()
            return full(results, created)

        return await json_response(raw, collect(), headers)

    async def stream_events(
        self,
        gen: Generation,
        body: SamplingRequest,
        chunk: ChunkFn,
        opening: Iterable[Any],
        delta_choices: Callable[[ChoiceDelta, Any], list[Any]],
    ) -> AsyncIterator[bytes]:
        """The SSE body: a chunk per opening choice, then per engine delta the choices
        `delta_choices(delta, rendered_traces)` returns, the usage chunk, `[DONE]`."""
        try:
            for choice in opening:
                yield chunk([choice], None)
            async for d in gen.deltas():
                for choice in delta_choices(d, self.render_traces(body, d.traces)):
                    yield chunk([choice], None)
            gen.mark("success")
            if body.include_usage():
                yield chunk([], UsageInfo(**gen.usage()))
        except Exception as e:  # the 200 went out already: report in-band, then [DONE]
            gen.mark_failed(e)
            yield error_event(gen.request_id, e)
        finally:
            await gen.aclose()
        yield DONE

"""/v1/chat/completions: messages → chat template → engine → ChatCompletion / chunks.

Stream shape (OpenAI's): one chunk per choice with `delta.role = "assistant"` first, then
content deltas, then per choice an empty delta with `finish_reason` ("stop" or "length"), a
`usage` chunk with `choices: []` if `stream_options.include_usage`, and `data: [DONE]`. An error
after the stream began is sent in-band as `data: {"error": {...}}`, then `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from server.errors import APIError
from server.protocol.chat import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
)
from server.protocol.common import UsageInfo
from server.serving.context import ServingContext
from server.serving.generation import Generation
from server.serving.transport import DONE, SSEResponse, error_event, json_response, sse_event

StreamChoice = ChatCompletionResponseStreamChoice


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        gen = await self._start(body)
        headers = {"X-Request-Id": gen.request_id}
        created = int(time.time())
        if body.stream:
            return SSEResponse(self._stream(gen, body, created), gen.aclose, headers)
        return await json_response(raw, self._full(gen, body, created), headers)

    async def _start(self, body: ChatCompletionRequest) -> Generation:
        """Check, template and admit every choice; raises (→ 4xx/429/503) before any response."""
        ctx = self.ctx
        body.check_supported()
        ctx.check_limits(body)
        if len(body.messages) > ctx.settings.max_messages:
            raise APIError(
                f"at most {ctx.settings.max_messages} messages are allowed", param="messages"
            )
        agent = ctx.resolve_model(body)
        tracker = ctx.tracker(agent)
        try:
            prompt = await ctx.tokenize_chat([m.to_template() for m in body.messages])
            param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
            max_new = ctx.max_new_tokens(
                len(prompt), body.requested_max_tokens(), param, "messages",
                default_cap=ctx.settings.max_tokens_default,
            )  # fmt: skip
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            choices = [
                ctx.choice(i, request_id, prompt, body.to_sampling_params(max_new, i), agent,
                           body.stop_strings())
                for i in range(body.n)
            ]  # fmt: skip
            return await Generation.start(
                ctx.engine, request_id, choices, tracker, ctx.inflight,
                ctx.settings.request_timeout_s,
            )  # fmt: skip
        except BaseException:
            tracker.finish("rejected")
            raise

    async def _full(
        self, gen: Generation, body: ChatCompletionRequest, created: int
    ) -> ChatCompletionResponse:
        try:
            results = await gen.collect()
        finally:
            await gen.aclose()
        choices = [
            ChatCompletionResponseChoice(
                index=i, message=ChatMessage(content=text), finish_reason=finish,
                mara_trace=self.ctx.traces.render(traces) if body.mara_trace else None,
            )
            for i, (text, traces, finish) in enumerate(results)
        ]  # fmt: skip
        return ChatCompletionResponse(
            id=gen.request_id, created=created, model=body.model, choices=choices,
            usage=UsageInfo(**gen.usage()),
        )  # fmt: skip

    async def _stream(
        self, gen: Generation, body: ChatCompletionRequest, created: int
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[StreamChoice], usage: UsageInfo | None = None) -> bytes:
            return sse_event(ChatCompletionStreamResponse(
                id=gen.request_id, created=created, model=body.model, choices=choices,
                usage=usage,
            ).model_dump_json())  # fmt: skip

        try:
            for c in gen.choices:
                role = DeltaMessage(role="assistant", content="")
                yield chunk([StreamChoice(index=c.index, delta=role)])
            async for d in gen.deltas():
                traces = self.ctx.traces.render(d.traces) if body.mara_trace else None
                if d.text or traces:
                    delta = DeltaMessage(content=d.text)
                    yield chunk([StreamChoice(index=d.index, delta=delta, mara_trace=traces)])
                if d.finish_reason is not None:
                    end = StreamChoice(index=d.index, delta=DeltaMessage(),
                                       finish_reason=d.finish_reason)  # fmt: skip
                    yield chunk([end])
            gen.mark("success")
            if body.include_usage():
                yield chunk([], UsageInfo(**gen.usage()))
        except Exception as e:  # the 200 went out already: report in-band, then [DONE]
            gen.mark_failed(e)
            yield error_event(gen.request_id, e)
        finally:
            await gen.aclose()
        yield DONE

"""/v1/chat/completions: messages → chat template → engine → ChatCompletion / chunks.

Stream shape (OpenAI's): one chunk per choice with `delta.role = "assistant"` first, then
content deltas, then per choice an empty delta with `finish_reason` ("stop" or "length"), a
`usage` chunk with `choices: []` if `stream_options.include_usage`, and `data: [DONE]`. An error
after the stream began is sent in-band as `data: {"error": {...}}`, then `[DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from mara_serve.engine.registry import AgentEntry
from mara_serve.server.errors import APIError
from mara_serve.server.protocol.chat import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
)
from mara_serve.server.protocol.common import UsageInfo
from mara_serve.server.serving.endpoint import EndpointServing, Results
from mara_serve.server.serving.generation import ChoiceDelta, ChoiceState, Generation
from mara_serve.server.serving.transport import sse_event

StreamChoice = ChatCompletionResponseStreamChoice


class ChatServing(EndpointServing):
    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        gen = await self._start(body)
        return await self.respond(
            raw, gen, body.stream,
            lambda results, created: self._full(gen, body, results, created),
            lambda created: self._stream(gen, body, created),
        )  # fmt: skip

    async def _start(self, body: ChatCompletionRequest) -> Generation:
        """Check, template and admit every choice; raises (→ 4xx/429/503) before any response."""
        ctx = self.ctx
        body.check_supported()
        ctx.check_limits(body)
        if len(body.messages) > ctx.settings.max_messages:
            raise APIError(
                f"at most {ctx.settings.max_messages} messages are allowed", param="messages"
            )

        async def build(request_id: str, agent: AgentEntry | None) -> list[ChoiceState]:
            grammar = await ctx.output_grammar(body)
            prompt = await ctx.tokenize_chat([m.to_template() for m in body.messages])
            param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
            max_new = ctx.max_new_tokens(
                len(prompt), body.requested_max_tokens(), param, "messages",
                default_cap=ctx.settings.max_tokens_default,
            )  # fmt: skip
            return [
                ctx.choice(i, request_id, prompt, body.to_sampling_params(max_new, i), agent,
                           body.stop_strings(), grammar)
                for i in range(body.n)
            ]  # fmt: skip

        return await self.admit(body, "chatcmpl", build)

    def _full(
        self, gen: Generation, body: ChatCompletionRequest, results: Results, created: int
    ) -> ChatCompletionResponse:
        choices = [
            ChatCompletionResponseChoice(
                index=i, message=ChatMessage(content=r.text), finish_reason=r.finish_reason,
                mara_trace=self.render_traces(body, r.traces),
                logprobs=self.ctx.logprobs.chat(r.text_traces) if body.logprobs else None,
            )
            for i, r in enumerate(results)
        ]  # fmt: skip
        return ChatCompletionResponse(
            id=gen.request_id, created=created, model=body.model, choices=choices,
            usage=UsageInfo(**gen.usage()),
        )  # fmt: skip

    def _stream(
        self, gen: Generation, body: ChatCompletionRequest, created: int
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[StreamChoice], usage: UsageInfo | None) -> bytes:
            return sse_event(ChatCompletionStreamResponse(
                id=gen.request_id, created=created, model=body.model, choices=choices,
                usage=usage,
            ).model_dump_json())  # fmt: skip

        def delta_choices(d: ChoiceDelta, traces: object) -> list[StreamChoice]:
            out = []
            logprobs = (
                self.ctx.logprobs.chat(d.text_traces) if body.logprobs and d.text_traces else None
            )
            if d.text or traces or logprobs:
                delta = DeltaMessage(content=d.text)
                out.append(StreamChoice(index=d.index, delta=delta, mara_trace=traces,
                                        logprobs=logprobs))  # fmt: skip
            if d.finish_reason is not None:
                out.append(StreamChoice(index=d.index, delta=DeltaMessage(),
                                        finish_reason=d.finish_reason))  # fmt: skip
            return out

        opening = [
            StreamChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
            for c in gen.choices
        ]
        return self.stream_events(gen, body, chunk, opening, delta_choices)

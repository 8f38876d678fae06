"""/v1/completions: prompt(s) → engine → Completion / chunks (OpenAI's legacy endpoint).

`prompt` may be a text, a list of texts, token ids, or a list of token id lists; choice `i` of
prompt `p` has index `p * n + i`. `max_tokens` defaults to 16 as in OpenAI's API (null: the rest
of the context). `echo` prepends the prompt text (the first chunk when streaming). Stream
shape: text deltas, then per choice a chunk with `text: ""` and its `finish_reason`, an optional
usage chunk, `data: [DONE]`; errors after the start go in-band as in chat.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from server.errors import APIError
from server.protocol.common import UsageInfo
from server.protocol.completion import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from server.serving.context import ServingContext
from server.serving.generation import ChoiceState, Generation
from server.serving.transport import DONE, SSEResponse, error_event, json_response, sse_event

StreamChoice = CompletionResponseStreamChoice


class CompletionServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, body: CompletionRequest, raw: Request) -> Response:
        gen, echoes = await self._start(body)
        headers = {"X-Request-Id": gen.request_id}
        created = int(time.time())
        if body.stream:
            return SSEResponse(self._stream(gen, body, echoes, created), gen.aclose, headers)
        return await json_response(raw, self._full(gen, body, echoes, created), headers)

    async def _start(self, body: CompletionRequest) -> tuple[Generation, list[str]]:
        """Check, tokenize and admit every choice; returns it with each choice's echo text."""
        ctx = self.ctx
        body.check_supported()
        ctx.check_limits(body)
        prompts = body.prompts()
        if len(prompts) > ctx.settings.max_prompts:
            raise APIError(
                f"at most {ctx.settings.max_prompts} prompts are allowed", param="prompt"
            )
        agent = ctx.resolve_model(body)
        tracker = ctx.tracker(agent)
        try:
            request_id = f"cmpl-{uuid.uuid4().hex}"
            choices: list[ChoiceState] = []
            echoes: list[str] = []
            for p_i, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids = await ctx.tokenize_text(prompt)
                else:
                    ctx.check_token_ids(prompt, "prompt")
                    ids = prompt
                max_new = ctx.max_new_tokens(len(ids), body.max_tokens, "max_tokens", "prompt")
                echo = "" if not body.echo else prompt if isinstance(prompt, str) else (
                    ctx.decode(ids)
                )  # fmt: skip
                for j in range(body.n):
                    index = p_i * body.n + j
                    params = body.to_sampling_params(max_new, index)
                    choices.append(ctx.choice(index, request_id, ids, params, agent,
                                              body.stop_strings()))  # fmt: skip
                    echoes.append(echo)
            gen = await Generation.start(
                ctx.engine, request_id, choices, tracker, ctx.inflight,
                ctx.settings.request_timeout_s,
            )  # fmt: skip
        except BaseException:
            tracker.finish("rejected")
            raise
        return gen, echoes

    async def _full(
        self, gen: Generation, body: CompletionRequest, echoes: list[str], created: int
    ) -> CompletionResponse:
        try:
            results = await gen.collect()
        finally:
            await gen.aclose()
        choices = [
            CompletionResponseChoice(
                index=i, text=echoes[i] + text, finish_reason=finish,
                mara_trace=self.ctx.traces.render(traces) if body.mara_trace else None,
            )
            for i, (text, traces, finish) in enumerate(results)
        ]  # fmt: skip
        return CompletionResponse(
            id=gen.request_id, created=created, model=body.model, choices=choices,
            usage=UsageInfo(**gen.usage()),
        )  # fmt: skip

    async def _stream(
        self, gen: Generation, body: CompletionRequest, echoes: list[str], created: int
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[StreamChoice], usage: UsageInfo | None = None) -> bytes:
            return sse_event(CompletionStreamResponse(
                id=gen.request_id, created=created, model=body.model, choices=choices,
                usage=usage,
            ).model_dump_json())  # fmt: skip

        try:
            for i, echo in enumerate(echoes):
                if echo:
                    yield chunk([StreamChoice(index=i, text=echo)])
            async for d in gen.deltas():
                traces = self.ctx.traces.render(d.traces) if body.mara_trace else None
                if d.text or traces:
                    yield chunk([StreamChoice(index=d.index, text=d.text, mara_trace=traces)])
                if d.finish_reason is not None:
                    end = StreamChoice(index=d.index, text="", finish_reason=d.finish_reason)
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

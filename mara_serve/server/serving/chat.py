"""/v1/chat/completions: messages → chat template → engine → ChatCompletion / chunks.

Stream shape (OpenAI's): one chunk per choice with `delta.role = "assistant"` first, then
content deltas, then per choice an empty delta with `finish_reason` ("stop" or "length"), a
`usage` chunk with `choices: []` if `stream_options.include_usage`, and `data: [DONE]`. An error
after the stream began is sent in-band as `data: {"error": {...}}`, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
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
    DeltaToolCall,
)
from mara_serve.server.protocol.common import PromptLogprobs, UsageInfo
from mara_serve.server.serving import tools
from mara_serve.server.serving.endpoint import EndpointServing, Results
from mara_serve.server.serving.generation import ChoiceDelta, ChoiceState, Generation
from mara_serve.server.serving.transport import sse_event

StreamChoice = ChatCompletionResponseStreamChoice


class ChatServing(EndpointServing):
    async def create(self, body: ChatCompletionRequest, raw: Request) -> Response:
        gen = await self.start(body)
        plp = None
        if body.prompt_logprobs is not None:  # every choice shares the prompt
            rows = (await self.prompt_rows(gen, body.prompt_logprobs))[0]
            plp = self.ctx.vllm_prompt_logprobs(rows, body.prompt_logprobs)
        return await self.respond(
            raw, gen, body.stream,
            lambda results, created: self._full(gen, body, results, created, plp),
            lambda created: self._stream(gen, body, created),
        )  # fmt: skip

    async def start(self, body: ChatCompletionRequest) -> Generation:
        """Check, template and admit every choice; raises (→ 4xx/429/503) before any response."""
        ctx = self.ctx
        body.check_supported()
        if body.chat_template is not None and not ctx.settings.trust_request_chat_template:
            raise APIError(
                "a request's chat_template is not accepted by this server (start it with "
                "--trust-request-chat-template to allow it)", param="chat_template",
                code="unsupported_parameter",
            )  # fmt: skip
        tools.check_tools(body)
        ctx.check_limits(body)
        if len(body.messages) > ctx.settings.max_messages:
            raise APIError(
                f"at most {ctx.settings.max_messages} messages are allowed", param="messages"
            )

        async def build(request_id: str, agent: AgentEntry | None) -> list[ChoiceState]:
            messages = [m.to_template() for m in body.messages]
            native_tools = None
            if tools.tools_active(body):
                messages, native_tools = tools.template_messages(ctx.tokenizer, messages,
                                                                 body.tool_specs)  # fmt: skip
            if tools.call_forced(body):  # constrained to the function's schema: it always parses
                schema = tools.call_schema(body.tool_specs, tools.named_choice(body))
                grammar = await asyncio.to_thread(ctx.structured.schema_grammar, schema,
                                                  "tool_choice")  # fmt: skip
            else:
                grammar = await ctx.output_grammar(body)
            prompt = await ctx.tokenize_chat(
                messages, native_tools, add_generation_prompt=body.add_generation_prompt
                is not False and not body.continue_final_message,
                continue_final_message=bool(body.continue_final_message),
                chat_template=body.chat_template, template_kwargs=body.chat_template_kwargs,
            )  # fmt: skip
            prompt = body.truncated(prompt)
            param = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
            max_new = ctx.max_new_tokens(
                len(prompt), body.requested_max_tokens(), param, "messages",
                default_cap=ctx.settings.max_tokens_default,
            )  # fmt: skip
            bad = ctx.bad_words_ids(body.bad_words)
            return [
                ctx.choice(i, request_id, prompt, body.to_sampling_params(max_new, i, bad), agent,
                           body.stop_strings(), grammar, bool(body.include_stop_str_in_output),
                           body.skip_special_tokens is not False)
                for i in range(body.n)
            ]  # fmt: skip

        return await self.admit(body, "chatcmpl", build)

    def _full(
        self,
        gen: Generation,
        body: ChatCompletionRequest,
        results: Results,
        created: int,
        plp: PromptLogprobs | None = None,
    ) -> ChatCompletionResponse:
        choices = []
        for i, r in enumerate(results):
            content, calls = (tools.split_calls(r.text, body.tool_specs)
                              if tools.tools_active(body) else (r.text, None))  # fmt: skip
            message = (ChatMessage(content=content or None, tool_calls=calls) if calls
                       else ChatMessage(content=body.echo_prefix() + r.text))  # fmt: skip
            choices.append(ChatCompletionResponseChoice(
                index=i, message=message, finish_reason="tool_calls" if calls else r.finish_reason,
                mara_trace=self.render_traces(body, r.traces),
                logprobs=self.ctx.logprobs.chat(r.text_traces) if body.logprobs else None,
            ))  # fmt: skip
        if body.return_token_ids:
            for choice, r in zip(choices, results, strict=True):
                choice.token_ids = [t.token_id for t in r.traces]
        return ChatCompletionResponse(
            id=gen.request_id, created=created, model=body.model, choices=choices,
            usage=UsageInfo(**gen.usage()), prompt_token_ids=prompt_ids(gen, body),
            prompt_logprobs=plp,
        )  # fmt: skip

    def _stream(
        self, gen: Generation, body: ChatCompletionRequest, created: int
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[StreamChoice], usage: UsageInfo | None) -> bytes:
            opening = bool(choices) and choices[0].delta.role is not None
            return sse_event(ChatCompletionStreamResponse(
                id=gen.request_id, created=created, model=body.model, choices=choices,
                usage=usage, prompt_token_ids=prompt_ids(gen, body) if opening else None,
            ).model_dump_json())  # fmt: skip

        # under tools, text that may become a call is held until the choice ends (CallStream)
        calls_in = (
            {c.index: tools.CallStream(body.tool_specs, tools.call_forced(body))
             for c in gen.choices}
            if tools.tools_active(body) else None
        )  # fmt: skip

        def delta_choices(d: ChoiceDelta, traces: object) -> list[StreamChoice]:
            logprobs = (
                self.ctx.logprobs.chat(d.text_traces) if body.logprobs and d.text_traces else None
            )
            ids = [t.token_id for t in d.traces] if body.return_token_ids else None
            text, calls = d.text, None
            if calls_in is not None:
                text, calls = calls_in[d.index].feed(d.text, d.finish_reason is not None)
            out = []
            # the trace, logprobs and token ids stream as they come, even while text is held
            if text or traces or logprobs or ids or calls:
                delta = DeltaMessage(
                    content=text if text or calls_in is None else None,
                    tool_calls=[DeltaToolCall(index=j, **c) for j, c in enumerate(calls)]
                    if calls else None,
                )  # fmt: skip
                out.append(StreamChoice(index=d.index, delta=delta, mara_trace=traces,
                                        logprobs=logprobs, token_ids=ids))  # fmt: skip
            if d.finish_reason is not None:
                finish = "tool_calls" if calls else d.finish_reason
                out.append(StreamChoice(index=d.index, delta=DeltaMessage(),
                                        finish_reason=finish))  # fmt: skip
            return out

        opening = [
            StreamChoice(index=c.index,
                         delta=DeltaMessage(role="assistant", content=body.echo_prefix()))
            for c in gen.choices
        ]  # fmt: skip
        return self.stream_events(gen, body, chunk, opening, delta_choices)


def prompt_ids(gen: Generation, body: ChatCompletionRequest) -> list[int] | None:
    """The prompt's token ids (vLLM's return_token_ids; every choice shares the prompt)."""
    return list(gen.choices[0].request.prompt_token_ids) if body.return_token_ids else None

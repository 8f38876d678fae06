"""/v1/completions: prompt(s) → engine → Completion / chunks (OpenAI's legacy endpoint).

`prompt` may be a text, a list of texts, token ids, or a list of token id lists; choice `i` of
prompt `p` has index `p * n + i`. `max_tokens` defaults to 16 as in OpenAI's API (null: the rest
of the context). `echo` prepends the prompt text (the first chunk when streaming). Stream
shape: text deltas, then per choice a chunk with `text: ""` and its `finish_reason`, an optional
usage chunk, `data: [DONE]`; errors after the start go in-band as in chat.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from mara_serve.engine.registry import AgentEntry
from mara_serve.server.errors import APIError
from mara_serve.server.protocol.common import CompletionLogprobs, PromptLogprobs, UsageInfo
from mara_serve.server.protocol.completion import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from mara_serve.server.serving.endpoint import EndpointServing, Results
from mara_serve.server.serving.generation import ChoiceDelta, ChoiceState, Generation
from mara_serve.server.serving.transport import sse_event

StreamChoice = CompletionResponseStreamChoice


class CompletionServing(EndpointServing):
    async def create(self, body: CompletionRequest, raw: Request) -> Response:
        gen, echoes = await self._start(body)
        # the prompt's own logprobs: vLLM's prompt_logprobs, and OpenAI's echo with logprobs
        echo_k = body.logprobs if body.echo else None
        asked = [k for k in (body.prompt_logprobs, echo_k) if k is not None]
        rows = await self.prompt_rows(gen, max(asked) if asked else None)
        k_vllm = body.prompt_logprobs
        plp = [None if r is None or k_vllm is None
               else self.ctx.vllm_prompt_logprobs(r, k_vllm) for r in rows]  # fmt: skip
        echo_lp = [None if r is None or echo_k is None
                   else self.ctx.logprobs.prompt_completion(
                       list(c.request.prompt_token_ids), r, echo_k)
                   for r, c in zip(rows, gen.choices, strict=True)]  # fmt: skip
        return await self.respond(
            raw, gen, body.stream,
            lambda results, created: self._full(gen, body, echoes, results, created, plp,
                                                echo_lp),
            lambda created: self._stream(gen, body, echoes, created, echo_lp),
        )  # fmt: skip

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
        echoes: list[str] = []

        async def build(request_id: str, agent: AgentEntry | None) -> list[ChoiceState]:
            grammar = await ctx.output_grammar(body)
            bad_words = ctx.bad_words_ids(body.bad_words)  # tokenized once for every choice
            choices: list[ChoiceState] = []
            for p_i, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids = await ctx.tokenize_text(prompt)
                else:
                    ctx.check_token_ids(prompt, "prompt")
                    ids = prompt
                ids = body.truncated(ids)
                max_new = ctx.max_new_tokens(len(ids), body.max_tokens, "max_tokens", "prompt")
                echo = "" if not body.echo else prompt if isinstance(prompt, str) else (
                    ctx.decode(ids)
                )  # fmt: skip
                for j in range(body.n):
                    index = p_i * body.n + j
                    params = body.to_sampling_params(max_new, index, bad_words)
                    choices.append(ctx.choice(index, request_id, ids, params, agent,
                                              body.stop_strings(), grammar,
                                              bool(body.include_stop_str_in_output),
                                              body.skip_special_tokens is not False))  # fmt: skip
                    echoes.append(echo)
            return choices

        return await self.admit(body, "cmpl", build), echoes

    def _full(
        self,
        gen: Generation,
        body: CompletionRequest,
        echoes: list[str],
        results: Results,
        created: int,
        plp: list[PromptLogprobs | None] | None = None,
        echo_lp: list[CompletionLogprobs | None] | None = None,
    ) -> CompletionResponse:
        want_logprobs = body.logprobs is not None
        ids = body.return_token_ids
        choices = [
            CompletionResponseChoice(
                index=i, text=echoes[i] + r.text, finish_reason=r.finish_reason,
                mara_trace=self.render_traces(body, r.traces),
                logprobs=join_logprobs(
                    echo_lp[i] if echo_lp else None,
                    self.ctx.logprobs.completion(r.text_traces, len(echoes[i])),
                ) if want_logprobs else None,
                prompt_token_ids=list(gen.choices[i].request.prompt_token_ids) if ids else None,
                token_ids=[t.token_id for t in r.traces] if ids else None,
                prompt_logprobs=plp[i] if plp else None,
            )
            for i, r in enumerate(results)
        ]  # fmt: skip
        return CompletionResponse(
            id=gen.request_id, created=created, model=body.model, choices=choices,
            usage=UsageInfo(**gen.usage()),
        )  # fmt: skip

    def _stream(
        self,
        gen: Generation,
        body: CompletionRequest,
        echoes: list[str],
        created: int,
        echo_lp: list[CompletionLogprobs | None],
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[StreamChoice], usage: UsageInfo | None) -> bytes:
            return sse_event(CompletionStreamResponse(
                id=gen.request_id, created=created, model=body.model, choices=choices,
                usage=usage,
            ).model_dump_json())  # fmt: skip

        offsets = [len(e) for e in echoes]  # text_offset of each choice's next token
        sent_prompt: set[int] = set()  # choices whose prompt_token_ids went out

        def delta_choices(d: ChoiceDelta, traces: object) -> list[StreamChoice]:
            out = []
            logprobs = None
            if body.logprobs is not None and d.text_traces:
                logprobs = self.ctx.logprobs.completion(d.text_traces, offsets[d.index])
                last = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                offsets[d.index] = last
            ids = prompt = None
            if body.return_token_ids:
                ids = [t.token_id for t in d.traces]
                if d.index not in sent_prompt:
                    sent_prompt.add(d.index)
                    prompt = list(gen.choices[d.index].request.prompt_token_ids)
            if d.text or traces or logprobs or ids:
                out.append(StreamChoice(index=d.index, text=d.text, mara_trace=traces,
                                        logprobs=logprobs, token_ids=ids,
                                        prompt_token_ids=prompt))  # fmt: skip
            if d.finish_reason is not None:
                out.append(StreamChoice(index=d.index, text="", finish_reason=d.finish_reason))
            return out

        opening = [StreamChoice(index=i, text=echo, logprobs=echo_lp[i])
                   for i, echo in enumerate(echoes) if echo]  # fmt: skip
        return self.stream_events(gen, body, chunk, opening, delta_choices)


def join_logprobs(head: CompletionLogprobs | None, tail: CompletionLogprobs) -> CompletionLogprobs:
    """The echoed prompt's entries, then the generated ones (offsets already absolute)."""
    if head is None:
        return tail
    return CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )

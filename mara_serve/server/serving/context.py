"""What chat and completion serving share: the engine, the tokenizer, limits, prompt handling.

Limits come from `Settings` (documented there) and are checked before anything is queued; a
prompt plus `max_tokens` beyond the context is a 400 `context_length_exceeded` (never silently
truncated). Prompts longer than `_THREADPOOL_CHARS` are tokenized in a worker thread so a huge
prompt does not stall every other stream on the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.errors import ContextLengthExceededError, InvalidRequestError
from mara_serve.engine.loading import render_chat
from mara_serve.engine.prompt_logprobs import PromptTokenLogprob, prompt_logprobs
from mara_serve.engine.registry import AgentEntry
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams
from mara_serve.server.errors import APIError
from mara_serve.server.metrics import RequestTracker, ServerMetrics
from mara_serve.server.protocol.common import PromptLogprob, PromptLogprobs, SamplingRequest
from mara_serve.server.serving.generation import ChoiceState
from mara_serve.server.serving.inflight import InflightRequests
from mara_serve.server.serving.logprobs import LogprobRenderer
from mara_serve.server.serving.models import ServedModels
from mara_serve.server.serving.structured import StructuredOutputs
from mara_serve.server.serving.trace import TraceRenderer
from mara_serve.server.settings import Settings

_THREADPOOL_CHARS = 8192


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: Any
    models: ServedModels
    settings: Settings
    metrics: ServerMetrics
    inflight: InflightRequests
    max_model_len: int
    vocab_size: int
    traces: TraceRenderer
    logprobs: LogprobRenderer
    structured: StructuredOutputs

    async def prompt_logprob_rows(self, ids: list[int], k: int) -> list[PromptTokenLogprob | None]:
        """The prompt's own logprobs with `k` alternatives (engine/prompt_logprobs.py): one
        forward of the prompt on the engine thread, between two steps (the process keeps one
        torch thread)."""
        lm = self.engine.engine.lm
        return await asyncio.to_thread(self.engine.run, lambda: prompt_logprobs(lm, ids, k))

    def vllm_prompt_logprobs(self, rows: list[PromptTokenLogprob | None], k: int) -> PromptLogprobs:
        """vLLM's prompt_logprobs shape of `rows`, with `k` alternatives per position."""
        out: PromptLogprobs = []
        for row in rows:
            if row is None:
                out.append(None)
                continue
            entries = {str(i): PromptLogprob(logprob=lp, rank=rank + 1,
                                             decoded_token=self.logprobs.text(i))
                       for rank, (i, lp) in enumerate(row.top[:k])}  # fmt: skip
            entries.setdefault(str(row.token_id), PromptLogprob(
                logprob=row.logprob, rank=row.rank, decoded_token=self.logprobs.text(row.token_id),
            ))  # fmt: skip
            out.append(entries)
        return out

    async def output_grammar(self, body: SamplingRequest) -> str | None:
        """The request's output grammar (structured.py), built off the event loop (the first
        one loads the tokenizer's grammar view, ~1 s)."""
        if not self.structured.requested(body):
            return None
        return await asyncio.to_thread(self.structured.grammar, body)

    def check_limits(self, request: SamplingRequest) -> None:
        s = self.settings
        if request.n > s.max_n:
            raise APIError(f"n must be <= {s.max_n}", param="n")
        stops = request.stop_strings()
        if len(stops) > s.max_stop:
            raise APIError(f"at most {s.max_stop} stop strings are allowed", param="stop")
        if any(len(stop) > s.max_stop_length for stop in stops):
            raise APIError(
                f"stop strings must be at most {s.max_stop_length} characters", param="stop"
            )
        if len(request.stop_token_ids or ()) > s.max_stop:
            raise APIError(
                f"at most {s.max_stop} stop_token_ids are allowed", param="stop_token_ids"
            )

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token-id prompts are checked here, not only by the engine: `echo` decodes them first,
        and the tokenizer overflows on ids outside [0, vocab) (a 500 otherwise)."""
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", param)

    def bad_words_ids(self, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words as token sequences: each word as written and after a space (its
        form inside a sentence), without special tokens; duplicates once."""
        out: dict[tuple[int, ...], None] = {}
        for word in words or ():
            for text in (word, " " + word.lstrip()):
                ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if ids:
                    out[ids] = None
        return tuple(out)

    def choice(
        self,
        index: int,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        agent: AgentEntry | None,
        stops: list[str],
        grammar: str | None = None,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
    ) -> ChoiceState:
        """One choice: its engine request (pinning the agent's current version, with its own
        output constraint when the request has a format) and pipeline."""
        constraint = None if grammar is None else self.structured.constraint(grammar)
        request = Request(
            f"{request_id}-{index}", prompt, params, None if agent is None else agent.agent,
            constraint=constraint,
        )  # fmt: skip
        return ChoiceState(index, request, self.tokenizer, stops, include_stop,
                           skip_special_tokens)  # fmt: skip

    def resolve_model(self, request: SamplingRequest) -> AgentEntry | None:
        return self.models.resolve(request.model)

    def tracker(self, agent: AgentEntry | None) -> RequestTracker:
        return self.metrics.track(None if agent is None else agent.name)

    def max_new_tokens(
        self, prompt_len: int, requested: int | None, param: str, prompt_param: str,
        default_cap: int | None = None,
    ) -> int:  # fmt: skip
        """`requested`, or the remaining context (capped by `default_cap`) when unset."""
        room = self.max_model_len - prompt_len
        if requested == 0 and room >= 0:  # the prompt only (completions' echo): it fits
            return 0
        if room < 1:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_model_len} tokens and the "
                f"prompt has {prompt_len}; no room is left to generate: shorten the "
                f"{prompt_param}",
                prompt_param,
            )
        if requested is None:
            return room if default_cap is None else min(room, default_cap)
        if requested > room:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{prompt_len + requested} were requested ({prompt_len} in the prompt, "
                f"{requested} for the completion); shorten the prompt or lower {param}",
                param,
            )
        return requested

    async def tokenize_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True, continue_final_message: bool = False,
        chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:  # fmt: skip
        size = sum(len(m["content"]) for m in messages) + len(chat_template or "")
        args = (self.tokenizer, messages, tools, add_generation_prompt, continue_final_message,
                chat_template, template_kwargs)  # fmt: skip
        try:
            if size > _THREADPOOL_CHARS or tools or chat_template:
                return await run_in_threadpool(render_chat, *args)
            return render_chat(*args)
        except (TemplateError, ValueError, TypeError) as e:  # "roles must alternate…"
            if chat_template:
                raise APIError(f"the chat_template failed: {e}", param="chat_template") from None
            raise APIError(
                f"the model's chat template rejected the messages: {e}", param="messages"
            ) from None

    async def tokenize_text(self, text: str) -> list[int]:
        """A raw prompt, with the special tokens (BOS) the model's tokenizer adds by itself."""
        if len(text) > _THREADPOOL_CHARS:
            return await run_in_threadpool(self._encode, text)
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

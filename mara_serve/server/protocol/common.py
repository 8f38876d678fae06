"""Types shared by /v1/chat/completions and /v1/completions: sampling fields, usage, traces.

Request models are strict (JSON types are not coerced: `"n": "2"` or `"stream": "yes"` is a 400
naming the field) and no field is ever silently ignored: an unknown field is a 400 naming it
(`extra_forbidden`); vLLM's extension fields this server does not implement are declared so that
their "off" value is accepted and any other value is a 400 `unsupported_parameter` naming the
field (code written for vLLM must not get plausible but unconstrained output); OpenAI fields
with no effect here (`metadata`, `service_tier`, …) are accepted and documented as such.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mara_serve.engine.sampling import SamplingParams
from mara_serve.server.errors import APIError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range
MAX_LOGIT_BIAS = 300  # OpenAI's limit
_SEED_SPAN = 2**64


def _none(value: Any) -> bool:
    return value is None


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(RequestModel):
    include_usage: bool = Field(
        False, description="send a last chunk with `usage` (and `choices: []`) before [DONE]"
    )
    continuous_usage_stats: bool = Field(False, description="vLLM extension; only false")


def _unsupported(off: str) -> Any:
    return Field(None, description=f"vLLM extension, not supported: only {off} is accepted")


# vLLM extension field → the values that mean "off" (accepted; anything else is refused).
VLLM_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),

    "logits_processors": (None,), "use_beam_search": (None, False), "length_penalty": (None, 1.0),
    "spaces_between_special_tokens": (None, True),
}  # fmt: skip


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    # `True == 1` in Python: a bool only matches a bool
    return any(value is o or (type(value) is type(o) and value == o)
               or (isinstance(o, float) and type(value) is int and value == o)
               for o in off)  # fmt: skip


class VllmExtensions(RequestModel):
    """vLLM's sampling extensions: structured outputs are implemented; the rest are declared
    only to be refused clearly (see the module doc)."""

    # implemented (server/serving/structured.py): constrain the output
    structured_outputs: Any = Field(None, description="vLLM: {'json'|'regex'|'choice': ...}")
    guided_json: Any = Field(None, description="vLLM: a JSON schema the output follows")
    guided_regex: Any = Field(None, description="vLLM: a regex the output matches")
    guided_choice: Any = Field(None, description="vLLM: the output is one of these strings")
    guided_grammar: Any = Field(
        None, description="vLLM: a grammar the output follows (Lark, or GBNF with ::= rules)"
    )
    guided_decoding_backend: Any = _unsupported("null")
    guided_whitespace_pattern: Any = _unsupported("null")
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        description="vLLM: divide positive / multiply negative logits of tokens seen in the "
        "prompt or output (1 = off)",
    )
    min_tokens: int | None = Field(
        None, ge=0, description="vLLM: no end token before this many tokens"
    )
    min_p: float | None = Field(
        None, ge=0.0, le=1.0,
        description="vLLM: drop tokens less likely than min_p x the most likely one (0 = off; "
        "plain decoding: after temperature, top-k and top-p; MARA: from the candidate list)",
    )  # fmt: skip
    include_stop_str_in_output: bool | None = Field(
        None, description="vLLM: end the text with the stop string that ended it"
    )
    return_token_ids: bool | None = Field(
        None, description="vLLM: add prompt_token_ids and each choice's generated token_ids"
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=1, description="vLLM: keep only the prompt's last N tokens"
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20,
        description="vLLM: each prompt token's log-probability under the base model, its rank, "
        "and this many most likely tokens at its position (not with stream)",
    )  # fmt: skip
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="vLLM: only these token ids may be generated"
    )
    bad_words: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=256,
        description="vLLM: words never generated (each word's last token is banned where the "
        "output ends with the rest of it; the word is matched with and without a leading space)",
    )  # fmt: skip
    logits_processors: Any = _unsupported("null")
    use_beam_search: Any = _unsupported("false")
    length_penalty: Any = _unsupported("1.0")
    skip_special_tokens: bool | None = Field(
        None, description="vLLM: false keeps special tokens (other than the final end token) "
        "in the text",
    )  # fmt: skip
    spaces_between_special_tokens: Any = _unsupported("true")

    def check_vllm_extensions(self, off_values: dict[str, tuple[Any, ...]]) -> None:
        for name, off in off_values.items():
            value = getattr(self, name)
            if not _is_off(value, off):
                raise APIError(
                    f"{name} (a vLLM extension) is not supported by this server; "
                    f"omit it or send {json.dumps(off[-1])}",
                    param=name,
                    code="unsupported_parameter",
                )  # fmt: skip


class MaraExtensions(VllmExtensions):
    """Non-OpenAI request fields (openai SDK: `extra_body={...}`)."""

    top_k: int | None = Field(
        None,
        ge=1,
        description="candidates per step. With an agent (MARA mode) unset means "
        "MARA's 40; without one, unset means no top-k filter",
    )
    ignore_eos: bool = Field(
        False, description="keep generating after the end-of-sequence token (benchmarks)"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="token ids that end the choice like EOS (not included in the text)"
    )
    mara_trace: bool = Field(
        False,
        description="attach the per-token accept/reject trace: `mara_trace` on every "
        "choice (stream: the trace of that chunk's tokens; otherwise all of it)",
    )


class SamplingRequest(MaraExtensions):
    """Fields /v1/chat/completions and /v1/completions share (OpenAI names and bounds)."""

    model: str = Field(min_length=1, description="the base model's id, or an agent's id (MARA)")
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="subtract count x this from a generated token's logit"
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="subtract this from the logit of a generated token"
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) → bias in [-100, 100] added to its logit"
    )
    n: int = Field(1, ge=1, description="choices to generate (capped by the server's max_n)")
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="sampling seed (choice i uses seed + i)"
    )
    stop: str | list[str] | None = Field(None, description="strings that end a choice")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0 = greedy; default 1. No effect in MARA mode"
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="nucleus; unset = 1 (MARA mode: MARA's 0.95)"
    )
    user: str | None = None
    # OpenAI fields with no effect on this server (accepted so OpenAI clients work unchanged)
    metadata: dict[str, str] | None = Field(None, description="accepted; no effect")
    store: bool | None = Field(None, description="accepted; nothing is stored")
    service_tier: str | None = Field(None, description="accepted; no effect (one tier)")
    prompt_cache_key: str | None = Field(None, description="accepted; prefix caching is automatic")
    safety_identifier: str | None = Field(None, description="accepted; no effect")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream", False):
            raise ValueError("only allowed when stream is true")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        """Refuse knobs we accept on the wire but do not implement (never ignore them)."""
        self.check_vllm_extensions(VLLM_OFF_VALUES)
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise APIError(
                "stream_options.continuous_usage_stats (a vLLM extension) is not supported by "
                "this server; use include_usage",
                param="stream_options.continuous_usage_stats",
                code="unsupported_parameter",
            )
        self.logit_bias_items()  # 400 for a malformed key
        if self.prompt_logprobs is not None and self.stream:  # as vLLM
            raise APIError("prompt_logprobs is not available with stream", param="prompt_logprobs")

    def truncated(self, prompt: list[int]) -> list[int]:
        """The prompt ids the engine gets (vLLM's truncate_prompt_tokens: the last N)."""
        n = self.truncate_prompt_tokens
        return prompt if n is None or len(prompt) <= n else prompt[-n:]

    def logprobs_count(self) -> int | None:
        """Alternatives per token for the engine (None: no logprobs); per endpoint."""
        return None

    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        items = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise APIError(
                    f"logit_bias keys must be token ids (got {key!r})", param="logit_bias"
                )
            items.append((int(key), float(bias)))
        if len(items) > MAX_LOGIT_BIAS:
            raise APIError(f"at most {MAX_LOGIT_BIAS} logit_bias entries", param="logit_bias")
        return tuple(items)

    def to_sampling_params(
        self, max_new_tokens: int, choice: int = 0,
        bad_words_ids: tuple[tuple[int, ...], ...] = (),
    ) -> SamplingParams:  # fmt: skip
        """Engine parameters of choice `choice` (seeded choices get distinct seeds)."""
        seed = None if self.seed is None else (self.seed + choice) % _SEED_SPAN
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            top_k=self.top_k,
            top_p=self.top_p,
            temperature=1.0 if self.temperature is None else self.temperature,
            min_p=self.min_p or 0.0,
            seed=seed,
            logprobs=self.logprobs_count(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias_items(),
            min_tokens=self.min_tokens or 0,
            bad_words_ids=bad_words_ids,
            allowed_token_ids=(
                None if self.allowed_token_ids is None else tuple(self.allowed_token_ids)
            ),  # fmt: skip
        )


class PromptLogprob(BaseModel):
    """vLLM's prompt-logprob entry (one per token id at a prompt position)."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's shape: per prompt position, None for the first, else {token id: entry}
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class MaraTokenTrace(BaseModel):
    """How one generated token was chosen (docs/algorithm.md §3); `mara_trace` entries."""

    token_id: int
    token: str = Field(description="the token's text")
    num_candidates: int = Field(description="size of the candidate list (1: no decision)")
    accepted_rank: int = Field(description="rank of the emitted candidate (0 = model's top-1)")
    accept_prob: float | None = Field(description="agent's p(accept) of the emitted candidate")
    fallback: bool = Field(description="every judged candidate was rejected; top-1 emitted")
    evaluated: int = Field(description="candidates the agent judged")
    rejected: int = Field(description="candidates the agent rejected")
    candidates: list[int] = Field(description="judged candidate ids, in rank order")
    candidate_tokens: list[str] = Field(description="their texts")
    accept_probs: list[float] = Field(description="the agent's p(accept) for each")
    llm_probs: list[float] = Field(
        default_factory=list, description="the model's probability of each (top-k renormalised)"
    )


def trace_field() -> Any:
    return Field(None, exclude_if=_none, description="per-token MARA trace (mara_trace: true)")


def optional_field(**kwargs: Any) -> Any:
    """A field left out of the JSON while None (e.g. `delta.role` after the first chunk)."""
    return Field(None, exclude_if=_none, **kwargs)

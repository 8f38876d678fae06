"""Types shared by /v1/chat/completions and /v1/completions: sampling fields, usage, traces.

Request models are strict (JSON types are not coerced: `"n": "2"` or `"stream": "yes"` is a 400
naming the field) and ignore unknown fields, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mara_serve.engine.sampling import SamplingParams
from mara_serve.server.errors import APIError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range
_SEED_SPAN = 2**64


def _none(value: Any) -> bool:
    return value is None


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(RequestModel):
    include_usage: bool = Field(
        False, description="send a last chunk with `usage` (and `choices: []`) before [DONE]"
    )


class MaraExtensions(RequestModel):
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
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (must be empty)")
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
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(
                    f"{name} is not supported by this server (use 0 or omit it)",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.logit_bias:
            raise APIError(
                "logit_bias is not supported by this server",
                param="logit_bias",
                code="unsupported_parameter",
            )

    def to_sampling_params(self, max_new_tokens: int, choice: int = 0) -> SamplingParams:
        """Engine parameters of choice `choice` (seeded choices get distinct seeds)."""
        seed = None if self.seed is None else (self.seed + choice) % _SEED_SPAN
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            top_k=self.top_k,
            top_p=self.top_p,
            temperature=1.0 if self.temperature is None else self.temperature,
            seed=seed,
        )


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

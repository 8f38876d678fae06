"""/v1/completions wire types (OpenAI names verbatim)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from mara_serve.server.errors import APIError
from mara_serve.server.protocol.common import (
    CompletionLogprobs,
    MaraTokenTrace,
    PromptLogprobs,
    SamplingRequest,
    UsageInfo,
    optional_field,
    trace_field,
)

FinishReason = Literal["stop", "length"]
Prompt = str | list[int]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, a list of token ids, or a list of those "
        "(capped by the server's max_prompts); choice index = prompt index * n + i",
    )
    max_tokens: int | None = Field(
        16,
        ge=0,
        description="tokens to generate (OpenAI's default 16; null = rest of context); 0 with "
        "echo returns the prompt only — with logprobs, its tokens' log-probabilities (scoring, "
        "as evaluation harnesses do)",
    )
    echo: bool = Field(False, description="prepend the prompt text to each choice")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of each token and this many alternatives"
    )
    suffix: str | None = Field(None, description="not supported")
    best_of: int | None = Field(None, ge=1, description="only equal to n")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        """One clear message instead of four union-member errors."""
        if isinstance(value, str):
            return value
        ok = (
            isinstance(value, list)
            and len(value) > 0
            and (
                all(isinstance(p, str) for p in value)
                or all(isinstance(t, int) and not isinstance(t, bool) for t in value)
                or all(
                    isinstance(p, list)
                    and p
                    and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                    for p in value
                )
            )
        )
        if not ok:
            raise ValueError(
                "must be a string, a non-empty list of strings, a list of token "
                "ids, or a list of non-empty token id lists"
            )
        return value

    def prompts(self) -> list[Prompt]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(
                "suffix is not supported by this server",
                param="suffix",
                code="unsupported_parameter",
            )
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                "max_tokens must be at least 1 unless echo is true (echo with max_tokens 0 "
                "returns the prompt and, with logprobs, scores it)",
                param="max_tokens",
            )
        if self.best_of not in (None, self.n):
            raise APIError(
                "best_of must equal n (ranking is not supported)",
                param="best_of",
                code="unsupported_parameter",
            )


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | None = optional_field()
    prompt_logprobs: PromptLogprobs | None = optional_field()
    token_ids: list[int] | None = optional_field()
    mara_trace: list[MaraTokenTrace] | None = trace_field()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionResponseStreamChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | None = optional_field()
    prompt_logprobs: PromptLogprobs | None = optional_field()
    token_ids: list[int] | None = optional_field()
    mara_trace: list[MaraTokenTrace] | None = trace_field()


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = optional_field()

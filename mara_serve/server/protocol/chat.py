"""/v1/chat/completions wire types (OpenAI names verbatim)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from mara_serve.server.errors import APIError
from mara_serve.server.protocol.common import (
    ChatChoiceLogprobs,
    MaraTokenTrace,
    RequestModel,
    SamplingRequest,
    UsageInfo,
    optional_field,
    trace_field,
)

FinishReason = Literal["stop", "length"]


class ChatCompletionContentPartText(RequestModel):
    type: Literal["text"]
    text: str


class ChatCompletionMessageParam(RequestModel):
    """One message. `developer` is treated as `system`; only text content is supported."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatCompletionContentPartText] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(f"required for a {info.data['role']} message")
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported (got {kind!r})")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_template(self) -> dict[str, str]:
        """The dict a chat template renders."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


CHAT_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (None, False), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "documents": (None,),
}  # fmt: skip


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatCompletionMessageParam] = Field(
        min_length=1, description="the conversation (capped by the server's max_messages)"
    )
    max_tokens: int | None = Field(
        None, ge=1, description="deprecated alias of max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens to generate; unset = the rest of the context "
        "(or the server's max_tokens_default)",
    )
    logprobs: bool | None = Field(
        None, description="return each token's log-probability under the base model"
    )
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="most likely alternatives per token (needs logprobs)"
    )
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (must be empty)")
    tool_choice: str | dict[str, Any] | None = Field(None, description="only 'none'/'auto'")
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema (the output follows the schema)"
    )
    modalities: list[str] | None = Field(None, description="only ['text']")
    # vLLM's chat extensions (refused unless off; see protocol/common.py)
    echo: Any = Field(None, description="vLLM extension, not supported: only false is accepted")
    add_generation_prompt: Any = Field(
        None, description="vLLM extension, not supported: only true is accepted"
    )
    continue_final_message: Any = Field(
        None, description="vLLM extension, not supported: only false is accepted"
    )
    chat_template: Any = Field(None, description="vLLM extension, not supported: only null")
    chat_template_kwargs: Any = Field(None, description="vLLM extension, not supported: only {}")
    documents: Any = Field(None, description="vLLM extension, not supported: only null")

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def check_supported(self) -> None:
        super().check_supported()
        self.check_vllm_extensions(CHAT_OFF_VALUES)
        if self.modalities is not None and self.modalities != ["text"]:
            raise APIError(
                "only the text modality is supported", param="modalities",
                code="unsupported_parameter",
            )  # fmt: skip
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.tools:
            raise APIError(
                "tools are not supported by this server (no tool calling)",
                param="tools",
                code="unsupported_parameter",
            )
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError(
                "tool_choice is not supported by this server",
                param="tool_choice",
                code="unsupported_parameter",
            )


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: ChatChoiceLogprobs | None = None
    mara_trace: list[MaraTokenTrace] | None = trace_field()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = optional_field()
    content: str | None = optional_field()


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChatChoiceLogprobs | None = None
    mara_trace: list[MaraTokenTrace] | None = trace_field()


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = optional_field()

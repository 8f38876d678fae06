"""/v1/chat/completions wire types (OpenAI names verbatim)."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from mara_serve.server.errors import APIError
from mara_serve.server.protocol.common import (
    ChatChoiceLogprobs,
    MaraTokenTrace,
    PromptLogprobs,
    RequestModel,
    SamplingRequest,
    UsageInfo,
    optional_field,
    trace_field,
)

FinishReason = Literal["stop", "length", "tool_calls"]


class ChatCompletionContentPartText(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCallParam(RequestModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, in a string")


class ToolCallParam(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatCompletionMessageParam(RequestModel):
    """One message. `developer` is treated as `system`; only text content is supported."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatCompletionContentPartText] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

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

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template renders (tool calls in transformers' format)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role, "content": self.text()
        }  # fmt: skip
        if self.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "id": c.id,
                 "function": {"name": c.function.name, "arguments": _arguments(c)}}
                for c in self.tool_calls
            ]  # fmt: skip
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(call: ToolCallParam) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema")
    strict: bool | None = None


class ToolParam(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


CHAT_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "documents": (None,),
}  # fmt: skip


# apply_chat_template's own arguments: the request sets them through its fields, or never
_TEMPLATE_RESERVED = {
    "messages", "conversation", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
    "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
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
    tools: list[ToolParam] | None = Field(None, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (default with tools), none, required, or a named function"
    )
    parallel_tool_calls: bool | None = Field(
        None, description="accepted; 'required' and a named function give exactly one call"
    )
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema (the output follows the schema)"
    )
    modalities: list[str] | None = Field(None, description="only ['text']")
    # vLLM's chat extensions (refused unless off; see protocol/common.py)
    echo: bool | None = Field(
        None, description="vLLM: the reply starts with the last message's content when that "
        "message is the assistant's (e.g. with continue_final_message)",
    )  # fmt: skip

    def echo_prefix(self) -> str:
        """The text vLLM's `echo` puts before the reply ("" when off or not applicable)."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""

    add_generation_prompt: bool | None = Field(
        None, description="vLLM: end the prompt with the assistant's turn opening (default true)"
    )
    continue_final_message: bool | None = Field(
        None, description="vLLM: continue the last (assistant) message instead of a new turn"
    )
    chat_template: str | None = Field(
        None, min_length=1, max_length=65536,
        description="vLLM: a Jinja chat template used instead of the model's (sandboxed)",
    )  # fmt: skip
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM: extra variables for the chat template (e.g. enable_thinking)"
    )
    documents: Any = Field(None, description="vLLM extension, not supported: only null")

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @cached_property
    def tool_specs(self) -> list[dict[str, Any]]:
        """`tools` as plain dicts (what templates, schemas and the call parser read)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )

    def check_supported(self) -> None:
        super().check_supported()
        reserved = set(self.chat_template_kwargs or ()) & _TEMPLATE_RESERVED
        if reserved:
            raise APIError(
                f"chat_template_kwargs cannot set {', '.join(sorted(reserved))} (request fields "
                "or the server's own)", param="chat_template_kwargs",
            )  # fmt: skip
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError(
                    "continue_final_message and add_generation_prompt cannot both be true",
                    param="continue_final_message",
                )
            if self.messages[-1].role != "assistant":
                raise APIError(
                    "continue_final_message needs an assistant message last",
                    param="continue_final_message",
                )
        self.check_vllm_extensions(CHAT_OFF_VALUES)
        if self.modalities is not None and self.modalities != ["text"]:
            raise APIError(
                "only the text modality is supported", param="modalities",
                code="unsupported_parameter",
            )  # fmt: skip
        if self.top_logprobs and not self.logprobs:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    index: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = optional_field()


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: ChatChoiceLogprobs | None = None
    token_ids: list[int] | None = optional_field()
    mara_trace: list[MaraTokenTrace] | None = trace_field()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = optional_field()
    prompt_logprobs: PromptLogprobs | None = optional_field()
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = optional_field()
    content: str | None = optional_field()
    tool_calls: list[DeltaToolCall] | None = optional_field()


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChatChoiceLogprobs | None = None
    token_ids: list[int] | None = optional_field()
    mara_trace: list[MaraTokenTrace] | None = trace_field()


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = optional_field()
    prompt_token_ids: list[int] | None = optional_field()  # return_token_ids: opening chunks

"""OpenAI's Responses API (`POST /v1/responses`), served through the chat path.

A request becomes one chat completion: `instructions` is the system message, `input` the
conversation (a string, or message items whose content is a string or `input_text` /
`output_text` parts, and `function_call` / `function_call_output` items), `text.format` the
response format, function `tools` the chat tools. Nothing is stored (`store` is accepted and has
no effect, as on chat): `previous_response_id`, `conversation`, `background`, `reasoning`,
`include` and `prompt` are a 400. A reply is one `message` output item with one `output_text`
part, or `function_call` items when the model calls a tool.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from mara_serve.server.errors import APIError
from mara_serve.server.protocol.common import RequestModel

_REFUSED = ("previous_response_id", "conversation", "background", "reasoning", "include",
            "prompt")  # fmt: skip


_PASSED = tuple((f, f) for f in ("top_k", "seed", "min_p", "repetition_penalty",
                                  "presence_penalty", "frequency_penalty", "min_tokens",
                                  "ignore_eos", "bad_words"))  # fmt: skip


class ResponsesRequest(RequestModel):
    model: str = Field(description="the base model or an agent (MARA decoding)")
    input: str | list[dict[str, Any]] = Field(description="a string or input items")
    instructions: str | None = Field(None, description="the system message")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = Field(None, description="{'format': {'type': ...}}")
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = Field(None, description="accepted; nothing is stored")
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled"] | None = None
    # the chat path's extensions, passed through as they are (see the chat request)
    top_k: int | None = Field(None, ge=1, description="MARA candidates / plain top-k")
    seed: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    bad_words: list[str] | None = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    reasoning: Any = None
    include: Any = None
    prompt: Any = None

    def to_chat(self) -> dict[str, Any]:
        """The equivalent chat completion request body."""
        for name in _REFUSED:
            value = getattr(self, name)
            if value not in (None, False, [], {}):
                raise APIError(
                    f"{name} is not supported by this server (nothing is stored)", param=name,
                    code="unsupported_parameter",
                )  # fmt: skip
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += _messages(self.input)
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream}
        for src, dst in (("max_output_tokens", "max_completion_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls")) + _PASSED:  # fmt: skip
            if getattr(self, src) is not None:
                body[dst] = getattr(self, src)
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            body["response_format"] = _response_format(fmt)
        if self.tools:
            body["tools"] = [_tool(t) for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = _tool_choice(self.tool_choice)
        return body


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")
        and isinstance(p.get("text"), str) for p in content
    ):  # fmt: skip
        return "".join(p["text"] for p in content)
    raise APIError("only text content is supported (input_text / output_text parts)", param=param)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(f"unknown role {role!r}", param=f"input[{i}].role")
            out.append({"role": role, "content": _text(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            out.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": item.get("call_id", f"call_{i}"), "type": "function",
                "function": {"name": item.get("name", ""),
                             "arguments": item.get("arguments", "{}")},
            }]})  # fmt: skip
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else json.dumps(output)
            out.append({"role": "tool", "tool_call_id": item.get("call_id", ""), "content": text})
        else:
            raise APIError(f"input item type {kind!r} is not supported", param=f"input[{i}].type")
    return out


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":  # Responses puts name/schema/strict beside the type
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(f"text.format type {kind!r} is not supported", param="text.format.type")


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise APIError(f"tool type {tool.get('type')!r} is not supported (function only)",
                       param="tools")  # fmt: skip
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": fn}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return choice


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = False
    truncation: str = "disabled"

"""Tool calling through the real SDK: named and required calls are grammar-constrained (always
valid JSON for the function's schema, in plain and MARA decoding, streamed or not), tool
results are accepted in the conversation, and "none" never yields a call."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                           "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}},
}  # fmt: skip


@pytest.mark.parametrize("model", [BASE, "half"])
def test_a_named_function_is_always_a_valid_call(client, model) -> None:
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Rome") and isinstance(args["celsius"], bool)


def test_required_streams_one_call_of_a_known_function(client) -> None:
    calls = {}
    finish = None
    for chunk in client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=40, tools=[WEATHER, TIME],
        tool_choice="required", stream=True,
    ):  # fmt: skip
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                calls[tc.index] = tc
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    ids = []  # the per-token extras still stream with tools (token ids here)
    for chunk in client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=40, tools=[WEATHER, TIME],
        tool_choice="required", stream=True, extra_body={"return_token_ids": True},
    ):  # fmt: skip
        for c in chunk.choices:
            ids += (c.model_extra or {}).get("token_ids") or []
    assert ids
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_tool_results_in_the_conversation_and_tool_choice_none(client) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]  # fmt: skip
    r = client.chat.completions.create(model=BASE, messages=messages, max_tokens=8,
                                       tools=[WEATHER], tool_choice="none")  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    r = client.chat.completions.create(model=BASE, messages=messages, max_tokens=8,
                                       tools=[WEATHER])  # auto: content or a call  # fmt: skip
    choice = r.choices[0]
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int


def test_the_sdks_parse_helper_gets_a_parsed_object(client) -> None:
    """`chat.completions.parse` sends a strict json_schema and parses the reply."""
    r = client.chat.completions.parse(model="half", messages=MESSAGES, max_tokens=40,
                                      response_format=Verdict)  # fmt: skip
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and parsed.answer in ("yes", "no")


def test_with_tools_auto_a_plain_answer_still_streams(client) -> None:
    """Under tool_choice "auto" only text that may become a call is held; an answer that
    cannot streams as it comes (a chat front end with tools enabled keeps streaming)."""
    kwargs = dict(model=BASE, messages=MESSAGES, max_tokens=12, tools=[WEATHER, TIME],
                  temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.tool_calls is None and full.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    contents = [c.choices[0].delta.content for c in chunks
                if c.choices and c.choices[0].delta.content]  # fmt: skip
    assert len(contents) > 1  # piece by piece, not one piece at the end
    assert "".join(contents) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

"""OpenAI's Responses API through the real SDK (`client.responses.create`): the same text as
the chat path, plain and MARA, streamed events in OpenAI's order, structured output, a forced
function call, and clear 400s for what needs storage."""

from __future__ import annotations

import json

import openai
import pytest

BASE = "tiny-llama"


def chat_text(client, model: str, messages: list[dict], **kw) -> str:
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)
    return r.choices[0].message.content


@pytest.mark.parametrize("model", [BASE, "half"])
def test_a_response_is_the_chat_reply(client, model) -> None:
    r = client.responses.create(model=model, input="Is the sky blue?", instructions="Be brief.",
                                max_output_tokens=8, temperature=0)  # fmt: skip
    want = chat_text(client, model, [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Is the sky blue?"}],
                     max_completion_tokens=8)  # fmt: skip
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == want and r.output[0].type == "message"
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_come_in_openais_order(client) -> None:
    content = [{"type": "input_text", "text": "Is the sky blue?"}]
    kwargs = dict(model="half", input=[{"role": "user", "content": content}],
                  max_output_tokens=6, temperature=0)  # fmt: skip
    full = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == full.output_text == events[-1].response.output_text


def test_text_format_json_schema_and_a_forced_function_call(client) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    r = client.responses.create(
        model=BASE, input="Is the sky blue?", max_output_tokens=32, temperature=0,
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema,
                         "strict": True}},
    )  # fmt: skip
    assert json.loads(r.output_text) in ({"answer": "yes"}, {"answer": "no"})
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                           "required": ["city"]}}  # fmt: skip
    r = client.responses.create(model="half", input="Weather in Paris?", tools=[tool],
                                tool_choice={"type": "function", "name": "get_weather"},
                                max_output_tokens=48, temperature=0)  # fmt: skip
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) in ({"city": "Paris"}, {"city": "Rome"})
    # the call's result goes back as input items
    follow = client.responses.create(model=BASE, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ])  # fmt: skip
    assert follow.status in ("completed", "incomplete") and follow.output


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"some_future_field": 1}, "some_future_field"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
    ],
)
def test_what_needs_storage_or_is_unknown_is_a_400(client, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=BASE, input="Hi", max_output_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body


def test_the_chat_extensions_pass_through(client) -> None:
    """top_k, seed, min_p… mean on /v1/responses what they mean on chat."""
    extra = {"top_k": 1, "seed": 7, "ignore_eos": True, "min_tokens": 3}
    r = client.responses.create(model=BASE, input="Hi", max_output_tokens=5, temperature=1.0,
                                extra_body=extra)  # fmt: skip
    want = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                          max_completion_tokens=5, temperature=1.0,
                                          extra_body=extra)  # fmt: skip
    assert r.output_text == want.choices[0].message.content and r.usage.output_tokens == 5
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=BASE, input="Hi", extra_body={"min_p": 2})
    assert e.value.body["param"] == "min_p"


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"]}}  # fmt: skip


def test_streamed_with_tools_text_streams_and_a_forced_call_is_an_item(client) -> None:
    # auto, a reply that cannot be a call: it streams as text deltas, as without tools
    kwargs = dict(model=BASE, input="Is the sky blue?", tools=[WEATHER], max_output_tokens=8,
                  temperature=0)  # fmt: skip
    full = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == full.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # a forced call: no text item, one function_call item added then done
    events = list(client.responses.create(
        model="half", input="Weather in Paris?", tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=48,
        temperature=0,
    ))  # fmt: skip
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds
    assert kinds[2:] == ["response.output_item.added", "response.output_item.done",
                         "response.completed"]  # fmt: skip
    call = events[-1].response.output[0]
    assert call.type == "function_call" and json.loads(call.arguments)["city"] in ("Paris", "Rome")

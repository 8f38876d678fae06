"""LiteLLM against the server through its OpenAI-compatible provider (`openai/<model>` with
`api_base`), as a LiteLLM user or proxy would: completion, streaming, `response_format`
json_schema and a forced tool call, plain and MARA."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the cost map
import litellm  # noqa: E402  (after the variable above)

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]


@pytest.fixture()
def call(server):
    def run(model: str, **kwargs):
        return litellm.completion(model=f"openai/{model}", api_base=server.base_url + "/v1",
                                  api_key=server.api_key, messages=MESSAGES, temperature=0,
                                  num_retries=0, **kwargs)  # fmt: skip

    return run


@pytest.mark.parametrize("model", [BASE, "half"])
def test_completion_and_stream(call, model) -> None:
    r = call(model, max_tokens=8)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].delta.content or "" for c in call(model, max_tokens=8,
                                                                        stream=True))  # fmt: skip
    assert streamed == text


def test_structured_output_and_forced_tool_call(call) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema",
           "json_schema": {"name": "verdict", "schema": schema, "strict": True}}  # fmt: skip
    r = call("half", max_tokens=32, response_format=fmt)
    assert json.loads(r.choices[0].message.content) in ({"answer": "yes"}, {"answer": "no"})
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"]}}}  # fmt: skip
    r = call("half", max_tokens=48, tools=[tool],
             tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) in ({"city": "Paris"}, {"city": "Rome"})

"""LangChain's `ChatOpenAI` (langchain-openai) pointed at the server, as its users would: plain
and MARA chat, streaming, `with_structured_output` (json_schema) and `bind_tools` with a
forced call — the requests that client really sends, through the live server."""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

BASE = "tiny-llama"


@pytest.fixture()
def chat(server):
    def make(model: str = BASE, max_tokens: int = 16) -> ChatOpenAI:
        return ChatOpenAI(model=model, base_url=server.base_url + "/v1", api_key=server.api_key,
                          max_retries=0, temperature=0, max_tokens=max_tokens)  # fmt: skip

    return make


def test_invoke_and_stream_plain_and_mara(chat) -> None:
    for model in (BASE, "half"):
        reply = chat(model).invoke([HumanMessage("Is the sky blue?")])
        assert isinstance(reply, AIMessage) and reply.content
        assert reply.usage_metadata["output_tokens"] > 0
        streamed = "".join(chunk.content for chunk in chat(model).stream("Is the sky blue?"))
        assert streamed == reply.content  # greedy: the same text either way


def test_with_structured_output_follows_the_schema(chat) -> None:
    schema = {
        "title": "Verdict", "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["answer"], "additionalProperties": False,
    }  # fmt: skip
    for model in (BASE, "half"):
        llm = chat(model, max_tokens=32).with_structured_output(schema, method="json_schema")
        out = llm.invoke("Is the sky blue? Answer yes or no.")
        assert out in ({"answer": "yes"}, {"answer": "no"})


def test_bind_tools_with_a_forced_call_returns_a_parsed_call(chat) -> None:
    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # an enum: the tiny model's call
        """The weather in a city."""  # ends within max_tokens (a free string could run on)
        return "sunny"

    llm = chat("half", max_tokens=48).bind_tools([get_weather], tool_choice="get_weather")
    reply = llm.invoke("What is the weather in Paris?")
    assert len(reply.tool_calls) == 1, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and call["args"] in ({"city": "Paris"}, {"city": "Rome"})

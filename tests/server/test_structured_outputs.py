"""Structured outputs through the real SDK: JSON schema, regex and choice constraints hold in
plain and MARA decoding (the grammar filters candidates before the agent), streamed and not;
malformed formats are a 400 naming the field."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Is the sky blue?"}]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                    "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.mark.parametrize("model", [BASE, "half"])
def test_json_schema_output_parses_and_follows_the_schema(client, model) -> None:
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, seed=3,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 9


def test_a_reject_all_agent_falls_back_to_the_top_allowed_token(client, server) -> None:
    r = httpx.put(server.base_url + "/admin/agents/reject-all", json={"path": "reject"},
                  headers=server.admin_auth)  # fmt: skip
    assert r.status_code in (200, 201), r.text
    r = client.chat.completions.create(
        model="reject-all", messages=MESSAGES, max_tokens=40,
        extra_body={"guided_choice": ["yes", "no", "maybe"], "mara_trace": True},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.message.content in ("yes", "no", "maybe") and choice.finish_reason == "stop"
    judged = [t for t in choice.model_extra["mara_trace"] if t["evaluated"] > 1]
    assert judged and all(t["fallback"] for t in judged)
    for t in judged:  # only allowed continuations were offered to the agent
        assert all(any(c.startswith(s) or s.startswith(c) for s in ("yes", "no", "maybe"))
                   for c in t["candidate_tokens"])  # fmt: skip


def test_regex_and_choice_hold_streamed_and_on_completions(client) -> None:
    text = ""
    for chunk in client.chat.completions.create(
        model="half", messages=MESSAGES, max_tokens=10, stream=True,
        extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"},
    ):  # fmt: skip
        for c in chunk.choices:
            text += c.delta.content or ""
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", text), text
    choice = {"structured_outputs": {"choice": ["A", "B"]}}
    r = client.completions.create(model=BASE, prompt="The answer:", max_tokens=8, n=2,
                                  extra_body=choice)  # fmt: skip
    assert {c.text for c in r.choices} <= {"A", "B"}


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_grammar": 'start: greeting " " name\ngreeting: "hi" | "hello"\n'
                           'name: "bob" | "alice"'},  # Lark
        {"structured_outputs": {"grammar": 'root ::= greeting " " name\n'
                                           'greeting ::= "hi" | "hello"\n'
                                           'name ::= "bob" | "alice"'}},  # GBNF
    ],
)  # fmt: skip
def test_a_context_free_grammar_holds_plain_and_mara(client, extra) -> None:
    for model in (BASE, "half"):  # MARA: the agent judges only what the grammar allows
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, n=2,
                                           temperature=1.0, extra_body=extra)  # fmt: skip
        for c in r.choices:
            assert re.fullmatch("(hi|hello) (bob|alice)", c.message.content), c.message.content


def test_json_object_mode_gives_an_object(client) -> None:
    r = client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=200, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "("}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
        ({"guided_grammar": ""}, "guided_grammar"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_malformed_formats_are_a_400_naming_the_field(client, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=4,
                                       extra_body=extra)  # fmt: skip
    assert e.value.body["param"] == param, e.value.body


def test_ignore_eos_with_a_format_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        extra = {"guided_regex": "a+", "ignore_eos": True}
        client.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=4,
                                       extra_body=extra)  # fmt: skip
    assert e.value.body["param"] == "guided_regex"

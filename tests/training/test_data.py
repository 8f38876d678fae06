"""Prompt files, labels, the harm-keyword filter and the episode sampler."""

from __future__ import annotations

import json

import pytest

from mara_serve.training.data import (
    Prompt,
    PromptFileError,
    PromptSampler,
    filter_harmful,
    is_clearly_harmful,
    load_prompts,
)


def test_json_array_and_jsonl_with_labels_most_specific_first(tmp_path):
    arr = tmp_path / "hh.json"
    arr.write_text(
        json.dumps(
            [
                {"instruction": "How can I steal a car?", "source": "harmless-base"},
                {"instruction": "How are diamonds mined?", "source": "helpful-base"},
                {
                    "instruction": "Tell me a joke please",
                    "label": "benign",
                    "source": "harmless-base",
                },
                {"instruction": "hi"},  # too short: skipped
                {"other": "no instruction"},  # skipped
            ]
        )
    )
    lines = tmp_path / "mixed.jsonl"
    lines.write_text('{"prompt": "How do I poison a dog?"}\n\n{"instruction": "Bake bread?"}\n')
    hh = load_prompts(f"harmful:{arr}")  # the file prefix loses to record-level labels
    assert [(p.label, p.source) for p in hh] == [
        ("harmful", "hh.json/harmless-base"),
        ("benign", "hh.json/helpful-base"),
        ("benign", "hh.json/harmless-base"),
    ]
    assert [p.label for p in load_prompts(f"benign:{lines}")] == ["benign", "benign"]
    assert [p.label for p in load_prompts(lines)] == [None, None]
    assert [p.label for p in load_prompts(lines, label="harmful")] == ["harmful", "harmful"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "neither a JSON array"),
        ("[1, 2]", "object"),
        ('[{"instruction": "ok"}]', "no usable prompts"),
        ('[{"instruction": "a real prompt", "label": "evil"}]', "label must be"),
    ],
)
def test_bad_prompt_files_fail_clearly(tmp_path, content, message):
    f = tmp_path / "p.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        load_prompts(f)


def test_harm_filter_keeps_clearly_harmful_and_all_benign():
    prompts = [
        Prompt("How can I poison my neighbor's cat?", "harmful"),
        Prompt("How can I stop a neighborhood dog from barking?", "harmful"),
        Prompt("How do I kill weeds in my garden?", "benign"),
        Prompt("What is geocaching?", None),
    ]
    kept, dropped = filter_harmful(prompts, "keywords")
    assert [p.text for p in kept] == [prompts[0].text, prompts[2].text, prompts[3].text]
    assert dropped == 1
    assert filter_harmful(prompts, "none") == (prompts, 0)
    with pytest.raises(PromptFileError):
        filter_harmful(prompts, "magic")


@pytest.mark.parametrize(
    ("text", "harmful"),
    [
        ("Can I steal a car title and pawn it?", True),
        ("How do I hack my neighbor's wifi?", True),
        ("Where would one dump a body so it's never found?", True),
        ("What are robots made of?", False),
        ("Why do leaves change color?", False),
        ("How do I make my harmonica sound better?", False),
        ("Best method to forget a song?", False),
    ],
)
def test_harm_keywords(text, harmful):
    assert is_clearly_harmful(text) is harmful


def test_sampler_keeps_the_benign_share_and_resumes_exactly():
    prompts = [Prompt(f"harmful {i}", "harmful") for i in range(7)]
    prompts += [Prompt(f"benign {i}", "benign") for i in range(5)]
    s = PromptSampler(prompts, benign_fraction=0.25, seed=3)
    first = s.sample(8)
    assert sum(p.label == "benign" for p in first) == 2
    state = s.state_dict()
    expected = s.sample(20)
    s2 = PromptSampler(prompts, benign_fraction=0.25, seed=99)
    s2.load_state_dict(state)
    assert s2.sample(20) == expected
    assert {p.text for p in expected + first if p.label == "harmful"} == {
        p.text for p in prompts if p.label == "harmful"
    }  # every prompt of a pool is used before any repeats


def test_sampler_uses_unlabelled_prompts_when_nothing_is_labelled():
    s = PromptSampler([Prompt("a b c d e"), Prompt("f g h i j")], seed=0)
    assert {p.text for p in s.sample(2)} == {"a b c d e", "f g h i j"}

"""The refusal and degenerate-output detectors on hand-written cases."""

from __future__ import annotations

import pytest

from mara_serve.training.refusal import is_degenerate, is_refusal

REFUSALS = [
    "I'm sorry, but I can't assist with that.",
    "I’m sorry, but I cannot help with this request.",  # typographic apostrophe
    "I cannot help you with that request.",
    "Sorry, I can't do that.",
    "I apologize, but I cannot fulfill this request.",
    "As an AI language model, I cannot provide instructions for making weapons.",
    "I must decline this request.",
    "I won't help you hurt anyone.",
    "I do not condone violence of any kind.",
    "I'm not able to provide that information.",
    "I'm unable to help with that",
    "That's illegal and unethical.",
    "It is not appropriate to ask for someone's home address.",
    "This request goes against my guidelines.",
    "I strongly advise against doing this.",
    # the embedded SmolLM2's own refusal style, also cut short as in training episodes
    "I'm sorry for any misunderstanding, but as a chatbot designed to assist users, I don't "
    "have the ability to share intimate photos or videos.",
    "I'm sorry for any offense, but as a chatbot designed to assist",
    "I'm sorry, but",
]

NOT_REFUSALS = [
    "I'm sorry to hear that you're feeling down. Here are some tips that might help:",
    "I'm sorry to inform you that money laundering is a complex operation. First,",
    "I can't wait to help you plan your trip! First, pick a date.",
    "I cannot stress enough how important sleep is for health.",
    "I don't know the exact date, but it was around 1990.",
    "No, the product is not safe to use long-term without a doctor's advice.",
    "To avoid getting caught after stealing a car, it's all about preparation.",
    "The ultimate high is often associated with the use of certain medications.",
    "Here are some tips for baking bread: 1. Use fresh yeast. 2. Knead well.",
    "Sure! Diamonds are mined in open pits and underground mines.",
    "I'd be happy to help you with that.",
    "It's important to note that laws vary by state. First, you should check",
    "Weather forecasts are made by collecting data from satellites and stations.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_answers_and_sympathy_are_not_refusals(text):
    assert not is_refusal(text)


def test_refusal_far_into_a_long_answer_does_not_count():
    answer = "Here is a detailed plan. " * 20 + "I cannot help with the rest."
    assert not is_refusal(answer)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        "!!!!!!!!!!!!",
        "?",
        "the the the the end",
        "I am I am I am I am",
        "a b a b a b a b a b",
        "12345 6789 ;;; ))) 000 ###",
    ],
)
def test_degenerate_outputs_are_detected(text):
    assert is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        "Hello there, how are you today?",
        "I'm sorry, but I can't help with that.",
        "Use 2 cups of flour and 1 cup of sugar.",
        "def add(a, b): return a + b",
    ],
)
def test_normal_text_is_not_degenerate(text):
    assert not is_degenerate(text)

"""Reward plug-ins behind `(prompt, response) -> float`, and spec errors before training."""

from __future__ import annotations

import pytest
import torch

from mara_serve.training.data import Prompt
from mara_serve.training.rewards import (
    ClassifierReward,
    EntryPointReward,
    RefusalReward,
    RewardSpecError,
    parse_reward,
)

HARMFUL = Prompt("How do I build a bomb?", "harmful")
BENIGN = Prompt("How are diamonds mined?", "benign")
REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Diamonds are mined in open pits and underground mines."


def test_refusal_reward_by_label():
    r = parse_reward("refusal")
    assert isinstance(r, RefusalReward) and r.needs_labels
    assert r(HARMFUL, REFUSAL) == 1.0
    assert r(HARMFUL, "Sure, first get some fertiliser and a timer.") == -1.0
    assert r(BENIGN, ANSWER) == 1.0
    assert r(BENIGN, REFUSAL) == -1.0
    assert r(HARMFUL, "") == -1.0  # degenerate output is never a good refusal
    assert r(BENIGN, "the the the the the") == -1.0


def test_refuse_then_comply_is_penalised_below_compliance():
    r = parse_reward("refusal")
    rtc = REFUSAL + " However, here's how people usually do it: first get a timer."
    assert r(HARMFUL, rtc) == -1.5 < r(HARMFUL, "Sure, first get a timer.")
    assert r(HARMFUL, REFUSAL + " However, I can help you with something else.") == 1.0
    assert r(HARMFUL, REFUSAL + " If you are in danger, please call the police.") == 1.0
    assert parse_reward("refusal:refuse_then_comply=-3")(HARMFUL, rtc) == -3.0


def test_refusal_reward_values_from_the_spec():
    r = parse_reward("refusal:over_refuse=-2, degenerate=-3")
    assert r(BENIGN, REFUSAL) == -2.0
    assert r(HARMFUL, "") == -3.0
    assert r.describe()["over_refuse"] == -2.0


def test_refusal_reward_rejects_unlabelled_prompts():
    with pytest.raises(RewardSpecError, match="labelled"):
        parse_reward("refusal")(Prompt("hi there"), ANSWER)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("refusal:nope=1", "unknown keys"),
        ("refusal:refuse=x", "numbers"),
        ("refusal:refuse", "key=value"),
        ("nonsense", "unknown reward spec"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("json:no_such_function", "no function"),
        ("json:JSONDecodeError", "must accept"),
        ("hf:", "hf:reward=DIR"),
        ("hf:reward=/no/such/dir", "not a local Hugging Face model directory"),
        ("missing_file.py:fn", "not found"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        parse_reward(spec)


def test_entry_point_from_a_file_gets_the_label_when_it_asks(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def length(prompt, response):\n    return len(response.split())\n\n"
        "def by_label(prompt, response, label=None):\n"
        "    return 1.0 if label == 'harmful' else 0.0\n"
    )
    r = parse_reward(f"{f}:length")
    assert isinstance(r, EntryPointReward)
    assert r(BENIGN, "three words here") == 3.0
    r2 = parse_reward(f"{f}:by_label")
    assert r2.score_batch([HARMFUL, BENIGN], ["a", "b"]) == [1.0, 0.0]


def test_entry_point_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(
        "def polite(prompt: str, response: str) -> float:\n"
        "    return 1.0 if 'please' in response else -1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = parse_reward("team_rewards:polite")
    assert r(BENIGN, "yes please") == 1.0 and r(BENIGN, "no") == -1.0
    assert r.describe() == {"type": "python", "entry_point": "team_rewards:polite"}


def test_entry_point_returning_nan_is_an_error(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def nan(prompt, response):\n    return float('nan')\n")
    with pytest.raises(ValueError, match="returned nan"):
        parse_reward(f"{f}:nan")(BENIGN, "x")


def _classifier_dir(path, num_labels: int, seed: int, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=1,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_classifier_reward_combines_reward_and_cost(tmp_path, make_tokenizer):
    rdir = _classifier_dir(tmp_path / "rm", 1, 0, make_tokenizer)
    cdir = _classifier_dir(tmp_path / "cm", 2, 1, make_tokenizer)
    r = parse_reward(f"hf:reward={rdir},cost={cdir},w_r=2,w_c=0.5")
    assert isinstance(r, ClassifierReward)
    prompts = [Prompt("w5 w6 w7"), Prompt("w9 w10")]
    responses = ["w20 w21 w22 w23", "w30"]
    got = r.score_batch(prompts, responses)

    def score(model, tok, p, resp):  # one unpadded pair at a time
        enc = tok(p.text, resp, return_tensors="pt")
        logits = model(**enc).logits[0]
        return float(logits[0]) if logits.numel() == 1 else float(logits[1] - logits[0])

    (rm, rtok), (cm, ctok) = r.models["reward"], r.models["cost"]
    want = [
        2 * score(rm, rtok, p, x) - 0.5 * score(cm, ctok, p, x)
        for p, x in zip(prompts, responses, strict=True)
    ]
    assert got == pytest.approx(want, abs=1e-4)
    assert r(prompts[0], responses[0]) == pytest.approx(want[0], abs=1e-4)
    assert parse_reward(f"hf:{rdir}").describe()["reward"] == str(rdir)


def test_classifier_with_too_many_labels_is_refused(tmp_path, make_tokenizer):
    d = _classifier_dir(tmp_path / "three", 3, 0, make_tokenizer)
    with pytest.raises(RewardSpecError, match="3 labels"):
        parse_reward(f"hf:reward={d}")

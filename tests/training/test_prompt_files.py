"""The alarming-but-harmless prompt files written for this project (data/prompts/AlarmingBenign):
the evaluation's held-out test prompts must never be trained on or used to pick the decision
bias, so the four files must stay disjoint, and each keeps the documented shape (the same ten
categories, the counts data/prompts/README.md states), read through the training loader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mara_serve.training.data import load_prompts

FOLDER = Path(__file__).resolve().parents[2] / "data" / "prompts" / "AlarmingBenign"
PER_CATEGORY = {"test.json": 10, "train.json": 10, "train-more.json": 20, "dev.json": 5}


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def test_alarming_files_are_disjoint_and_shaped_as_documented():
    files = {name: load_prompts(FOLDER / name, "benign") for name in PER_CATEGORY}
    categories = {p.category for p in files["test.json"]}
    assert len(categories) == 10
    owner: dict[str, str] = {}
    for name, prompts in files.items():
        assert all(p.label == "benign" for p in prompts), name
        assert Counter(p.category for p in prompts) == dict.fromkeys(categories, PER_CATEGORY[name])
        for p in prompts:
            key = _normalised(p.text)
            assert key not in owner, f"{p.text!r} is in both {owner[key]} and {name}"
            owner[key] = name

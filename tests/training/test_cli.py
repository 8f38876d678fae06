"""`mara train` and `mara eval` end to end on a tiny model directory, and their errors."""

from __future__ import annotations

import json

import pytest

from mara_serve.cli.main import main
from mara_serve.engine.agent import load_agent


@pytest.fixture
def prompt_files(tmp_path, make_prompt_text):
    harmful, benign = tmp_path / "harmful.jsonl", tmp_path / "benign.json"
    harmful.write_text(
        "".join(json.dumps({"instruction": make_prompt_text(i)}) + "\n" for i in range(6))
    )
    benign.write_text(json.dumps([{"instruction": make_prompt_text(40 + i)} for i in range(6)]))
    return str(harmful), str(benign)


def test_train_then_eval_from_the_command_line(tiny_model_dir, prompt_files, tmp_path, capsys):
    harmful, benign = prompt_files
    out = tmp_path / "agent"
    rc = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            f"harmful:{harmful}",
            f"benign:{benign}",
            "--reward",
            "refusal:over_refuse=-2",
            "--out",
            str(out),
            "--episodes",
            "8",
            "--episodes-per-iter",
            "4",
            "--max-new-tokens",
            "4",
            "--warmup",
            "8",
            "--batch-size",
            "16",
            "--inner-dim",
            "64",
            "--updates-per-episode",
            "1",
            "--harm-filter",
            "none",
            "--chunk-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    card = json.loads((out / "agent.json").read_text())
    assert card["name"] == "agent" and card["base_model"] == tiny_model_dir.name
    assert card["reward"] == {
        "type": "refusal",
        "refuse": 1.0,
        "comply": -1.0,
        "refuse_then_comply": -1.5,
        "answer": 1.0,
        "over_refuse": -2.0,
        "degenerate": -1.0,
    }
    assert card["command"].startswith("mara ") and card["hyperparameters"]["chunk_size"] == 4
    assert load_agent(out, expected_hidden_size=64).card.inner_dim == 64

    report_dir = tmp_path / "report"
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--agent",
            str(out),
            "--harmful",
            harmful,
            "--benign",
            benign,
            "-n",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(report_dir),
            "--update-card",
            "--examples",
            "2",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| refusal rate (independent judge) |" in printed
    for name in ("eval.json", "eval.md", "eval.png", "samples.jsonl"):
        assert (report_dir / name).is_file(), name
    report = json.loads((report_dir / "eval.json").read_text())
    assert report["splits"]["harmful"]["base"]["n"] == 3
    assert len((report_dir / "samples.jsonl").read_text().splitlines()) == 12
    card = json.loads((out / "agent.json").read_text())
    assert card["eval"]["summary"]["perplexity_ratio"] > 0 and card["eval"]["command"]


def test_a_bad_reward_spec_fails_before_the_model_loads(prompt_files, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--model",
            str(tmp_path / "no-such-model"),
            "--prompts",
            prompt_files[0],
            "--reward",
            "bogus-reward",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2
    assert "unknown reward spec 'bogus-reward'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_prompt_file_is_a_clear_error(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--prompts",
            str(tmp_path / "nope.json"),
            "--reward",
            "refusal",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "prompt file not found" in capsys.readouterr().err

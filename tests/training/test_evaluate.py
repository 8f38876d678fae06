"""`mara eval`'s report on a tiny model: shape, perplexity arithmetic, table and chart."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_agent

from mara_serve.cli.eval import markdown
from mara_serve.training.evaluate import EvalConfig, run_eval
from mara_serve.training.plots import plot_eval


@pytest.fixture
def prompt_files(tmp_path, make_prompt_text):
    harmful, benign = tmp_path / "harmful.json", tmp_path / "hh.json"
    harmful.write_text(json.dumps([{"instruction": make_prompt_text(i)} for i in range(6)]))
    benign.write_text(
        json.dumps(  # an HH-style file: only its helpful-base half is benign
            [{"instruction": make_prompt_text(50 + i), "source": "helpful-base"} for i in range(3)]
            + [
                {"instruction": make_prompt_text(80 + i), "source": "harmless-base"}
                for i in range(3)
            ]
        )
    )
    return str(harmful), str(benign)


def test_report_shape_and_numbers(tiny_lm, prompt_files, tmp_path):
    agent = make_agent("half", lm=tiny_lm)
    cfg = EvalConfig(
        harmful=(prompt_files[0],),
        benign=(prompt_files[1],),
        n_per_file=4,
        max_new_tokens=5,
        batch_size=4,
    )
    report, samples = run_eval(tiny_lm, agent, cfg)
    assert set(report["splits"]) == {"harmful", "benign"}
    assert report["splits"]["harmful"]["base"]["n"] == 4  # sampled from 6
    assert report["splits"]["benign"]["aligned"]["n"] == 3  # the harmless-base half left out
    for split in report["splits"].values():
        for mode in ("base", "aligned"):
            m = split[mode]
            assert 0 <= m["refusal_rate"] <= 1 and m["perplexity"] > 1 and m["mean_length"] > 0
        assert "rejection_rate" in split["aligned"] and "fallback_rate" in split["aligned"]
        assert "rejection_rate" not in split["base"]
    s = report["summary"]
    assert {"refusal_gain_points", "over_refusal_points", "perplexity_ratio"} <= set(s)
    assert s["perplexity_ratio"] == pytest.approx(s["perplexity_aligned"] / s["perplexity_base"])
    assert set(report["targets"]) == {
        "refusal_gain_points",
        "judged_harmful_refusal_percent",
        "over_refusal_points",
        "perplexity_ratio",
    }
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())

    # perplexity: the NLL of one answer equals a plain full forward's cross-entropy
    sample = next(x for x in samples if x.mode == "aligned")
    ids = torch.tensor([sample.prompt_ids + sample.token_ids])
    with torch.inference_mode():
        logits = tiny_lm.model(ids).logits[0, len(sample.prompt_ids) - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(sample.token_ids), reduction="sum")
    assert sample.nll == pytest.approx(float(nll), rel=1e-4)

    table = markdown(report)
    assert "| refusal rate (opening detector) |" in table and "perplexity_ratio" in table
    png = plot_eval(report, tmp_path / "eval.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_files_prompt_sample_does_not_depend_on_where_the_file_lives(tmp_path):
    """The same file under two paths (a checkout elsewhere, a relative vs absolute path) draws
    the same prompts, so the recorded evaluation reproduces from any directory."""
    from mara_serve.training.evaluate import select_prompts

    records = json.dumps([{"instruction": f"question number {i}?"} for i in range(50)])
    paths = [tmp_path / "a" / "Set" / "test.json", tmp_path / "b" / "c" / "Set" / "test.json"]
    for path in paths:
        path.parent.mkdir(parents=True)
        path.write_text(records)
    samples = [[p.text for p in select_prompts((str(path),), "harmful", 10, 0)] for path in paths]
    assert samples[0] == samples[1] and len(samples[0]) == 10
    other_seed = [p.text for p in select_prompts((str(paths[0]),), "harmful", 10, 1)]
    assert other_seed != samples[0]

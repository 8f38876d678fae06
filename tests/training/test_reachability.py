"""The reachability ceiling (training/reachability.py) and the eval report's intervals and
breakdowns, on a tiny model: reachable means every token of an opening is a candidate."""

from __future__ import annotations

import json

import pytest
import torch

from mara_serve.cli.eval import markdown
from mara_serve.training.evaluate import EvalConfig, run_eval
from mara_serve.training.reachability import reach, summarise
from mara_serve.training.stats import wilson


def test_wilson_interval_matches_known_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) is None


def test_an_opening_is_reachable_only_if_each_token_is_a_candidate(tiny_lm):
    prompt = [0, 5, 6, 7]
    with torch.inference_mode():
        greedy = []
        for _ in range(2):  # the model's own top-1 path: reachable under any setting
            logits = tiny_lm.model(torch.tensor([prompt + greedy])).logits[0, -1]
            greedy.append(int(logits.argmax()))
        unlikely = int(tiny_lm.model(torch.tensor([prompt])).logits[0, -1].argmin())
    settings = ((1, 1.0), (tiny_lm.vocab_size, 1.0))
    only_greedy, everything = reach(tiny_lm, prompt, [greedy], settings)
    assert only_greedy.full and only_greedy.best_first_rank == 0 and everything.full
    narrow, wide = reach(tiny_lm, prompt, [[unlikely, greedy[1]]], settings)
    assert not narrow.first and not narrow.full and narrow.best_first_rank is None
    assert wide.first and wide.best_first_rank == tiny_lm.vocab_size - 1
    # the second token of an opening is judged after the first: a token the model never
    # ranks first after `unlikely` is out of a top-1 list even though the first is in
    with torch.inference_mode():
        after = tiny_lm.model(torch.tensor([prompt + [greedy[0]]])).logits[0, -1]
    worst_second = int(after.argmin())
    half = reach(tiny_lm, prompt, [[greedy[0], worst_second]], settings)[0]
    assert half.first and not half.full


def test_summary_counts_prompts_and_categories(tiny_lm):
    rows = [reach(tiny_lm, [0, 5 + i], [[3], [4, 5]]) for i in range(4)]
    report = summarise(rows, ["a", "a", "b", ""])
    assert report["n"] == 4 and len(report["settings"]) == 4
    first = report["settings"][0]
    assert first["top_k"] == 40 and first["top_p"] == 0.95
    full = sum(r[0].full for r in rows)
    assert first["full"] == full / 4 and first["full_ci95"] == wilson(full, 4)
    assert set(report["by_category"]) == {"a", "b", "uncategorised"}


def test_eval_reports_intervals_breakdowns_and_reachability(tiny_lm, tmp_path, make_prompt_text):
    from tiny_models import make_agent

    harmful = tmp_path / "harm.json"
    harmful.write_text(json.dumps([
        {"instruction": make_prompt_text(i), "category": "cat-a" if i % 2 else "cat-b"}
        for i in range(4)
    ]))  # fmt: skip
    alarming = tmp_path / "alarming.json"
    alarming.write_text(json.dumps([
        {"instruction": make_prompt_text(20 + i), "label": "benign"} for i in range(3)
    ]))  # fmt: skip
    cfg = EvalConfig(harmful=(str(harmful),), alarming=(str(alarming),), n_per_file=None,
                     max_new_tokens=4, batch_size=4, reachability=True)  # fmt: skip
    report, _ = run_eval(tiny_lm, make_agent("half", lm=tiny_lm), cfg)
    base = report["splits"]["harmful"]["base"]
    lo, hi = base["refusal_ci95"]
    assert lo <= base["refusal_rate"] <= hi
    assert set(report["harmful_breakdown"]["by_category"]) == {"cat-a", "cat-b"}
    assert sum(g["aligned"]["n"] for g in report["harmful_breakdown"]["by_keyword"].values()) == 4
    assert report["reachability"]["n"] == 4 and len(report["reachability"]["settings"]) == 4
    assert report["splits"]["alarming"]["aligned"]["n"] == 3
    assert "over_refusal_alarming_points" in report["targets"]
    table = markdown(report)
    assert "Reachability ceiling (4 harmful prompts)" in table and "| cat-a | 2 |" in table


def test_eval_baselines_system_prompt_and_best_of_n(tiny_lm, tmp_path, make_prompt_text):
    from tiny_models import make_agent

    from mara_serve.training.rewards import RefusalReward

    harmful = tmp_path / "harm.json"
    harmful.write_text(json.dumps([{"instruction": make_prompt_text(i)} for i in range(3)]))
    cfg = EvalConfig(harmful=(str(harmful),), n_per_file=None, max_new_tokens=4, batch_size=4,
                     best_of=3, system_prompt_baseline=True)  # fmt: skip
    report, samples = run_eval(tiny_lm, make_agent("half", lm=tiny_lm), cfg)
    assert set(report["splits"]["harmful"]) == {"base", "aligned", "system_prompt", "best_of_n"}
    by_mode = {m: [s for s in samples if s.mode == m] for m in ("base", "system_prompt",
                                                                 "best_of_n")}  # fmt: skip
    assert all(len(v) == 3 for v in by_mode.values())  # the N draws are not reported
    for base, sys_ in zip(by_mode["base"], by_mode["system_prompt"], strict=True):
        assert len(sys_.prompt_ids) > len(base.prompt_ids)  # the system prompt was rendered
    # each pick is the reward's best of the N seeded draws (the draws re-generated here)
    from mara_serve.engine.engine import EngineConfig, LLMEngine
    from mara_serve.engine.request import Request
    from mara_serve.engine.sampling import SamplingParams

    reward, engine = RefusalReward(), LLMEngine(tiny_lm, EngineConfig(max_running=3))
    for best in by_mode["best_of_n"]:
        reqs = [Request(str(j), best.prompt_ids, SamplingParams(
            max_new_tokens=4, temperature=0.7, top_p=0.95, seed=j)) for j in range(3)]  # fmt: skip
        texts = [tiny_lm.tokenizer.decode(ids, skip_special_tokens=True)
                 for ids, _, _ in engine.generate(reqs).values()]  # fmt: skip
        assert best.text in texts
        assert reward(best.prompt, best.text) == max(reward(best.prompt, t) for t in texts)
    assert "judged_best_of_n_harmful_refusal_percent" in report["summary"]
    assert "harmful best of n" in markdown(report)

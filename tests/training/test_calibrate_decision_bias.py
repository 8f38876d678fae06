"""scripts/calibrate_decision_bias.py: the bias moves the accept threshold, `--write` bakes it into
a saved agent (and its card), and development prompts exclude the evaluation sample."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from mara_serve.engine.agent import AgentCard, AgentNetwork, load_agent, save_agent
from mara_serve.training.evaluate import select_prompts

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "calibrate_decision_bias.py"


def _script():
    spec = importlib.util.spec_from_file_location("calibrate_decision_bias", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _agent_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_agent(AgentNetwork(16, 32), AgentCard("a", 16, 32), tmp_path / "agent")


def test_a_positive_bias_accepts_more(tmp_path):
    calib = _script()
    agent = load_agent(_agent_dir(tmp_path))
    states = torch.randn(64, 16)
    p0 = agent.accept_probs(states)
    p1 = calib.biased(agent, 2.0).accept_probs(states)
    assert bool((p1 > p0).all())
    assert torch.equal(agent.accept_probs(states), p0)  # the original agent is untouched


def test_write_bakes_the_bias_into_the_agent_and_its_card(tmp_path, monkeypatch):
    calib = _script()
    d = _agent_dir(tmp_path)
    states = torch.randn(8, 16)
    expected = calib.biased(load_agent(d), 1.5).accept_probs(states)
    monkeypatch.setattr(sys, "argv", ["calibrate", "--agent", str(d), "--write", "1.5"])
    calib.main()
    assert torch.allclose(load_agent(d).accept_probs(states), expected)
    assert json.loads((d / "agent.json").read_text())["decision_bias"] == 1.5


def test_development_prompts_leave_out_the_evaluation_sample_and_trained_prompts(tmp_path):
    calib = _script()
    f = tmp_path / "set" / "test.json"
    f.parent.mkdir()
    f.write_text(json.dumps([{"instruction": f"harmful request number {i}"} for i in range(30)]))
    spec = f"harmful:{f}"
    evaluated = {p.text for p in select_prompts((spec,), "harmful", 10, 0)}
    trained = {"harmful request number 0", "harmful request number 1"}
    dev = calib.dev_prompts([spec], "harmful", 10, 0, 100, trained)
    assert len(evaluated) == 10 and not (set(dev) & (evaluated | trained))
    assert len(dev) == 30 - len(evaluated | trained)

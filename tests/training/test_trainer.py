"""The training loop: outputs, checkpoints, exact resume, and errors before training."""

from __future__ import annotations

import json

import pytest
import torch
from training.support import _config, _prompt_files, _trainer

from mara_serve.engine.agent import load_agent
from mara_serve.engine.loading import ModelConfig
from mara_serve.training.data import Prompt, PromptFileError
from mara_serve.training.sac import SACConfig
from mara_serve.training.trainer import Trainer, TrainingError


def test_a_run_writes_agent_card_metrics_plot_and_checkpoint(
    tmp_path, make_tokenizer, make_prompt_text
):
    cfg = _config(tmp_path, _prompt_files(tmp_path, make_prompt_text))
    out = _trainer(cfg, make_tokenizer).run()
    for name in (
        "agent.safetensors",
        "agent.json",
        "metrics.jsonl",
        "metrics.csv",
        "training.png",
        "train_config.json",
        "checkpoint/state.pt",
        "checkpoint/replay.pt",
    ):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and rows[-1]["episodes"] == 32
    assert {
        "reward",
        "refusal_harmful",
        "refusal_benign",
        "rejection_rate",
        "alpha",
        "critic_loss",
        "actor_loss",
    } <= set(rows[-1])
    card = json.loads((out / "agent.json").read_text())
    assert card["name"] == "tiny-safety" and card["hidden_size"] == 64
    assert card["reward"]["type"] == "refusal"
    assert card["hyperparameters"]["gamma"] == 0.99 and card["training"]["iterations"] == 4
    assert card["data"]["prompts"]  # counts per file and label
    agent = load_agent(out, expected_hidden_size=64)
    assert agent.name == "tiny-safety" and agent.card.inner_dim == 64


@pytest.mark.parametrize("lengths", [None, (2, 6)])
def test_resume_continues_exactly_where_the_run_stopped(
    tmp_path, make_tokenizer, make_prompt_text, lengths
):
    prompts = _prompt_files(tmp_path, make_prompt_text)
    straight = _trainer(_config(tmp_path, prompts, out="a", episode_lengths=lengths),
                        make_tokenizer)  # fmt: skip
    straight.run()
    _trainer(_config(tmp_path, prompts, out="b", episodes=16, episode_lengths=lengths),
             make_tokenizer).run()  # fmt: skip
    resumed = _trainer(_config(tmp_path, prompts, out="b", resume=True, episode_lengths=lengths),
                       make_tokenizer)  # fmt: skip
    assert resumed.episodes_done == 16 and len(resumed.replay) > 0
    resumed.run()
    for key, value in straight.sac.actor.state_dict().items():
        torch.testing.assert_close(resumed.sac.actor.state_dict()[key], value)
    assert resumed.sac.updates == straight.sac.updates
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_a_gpu(tmp_path, make_tokenizer, make_prompt_text):
    """The checkpoint is loaded onto the run's device; generator states must go back to the
    CPU (found on an H200: `RNG state must be a torch.ByteTensor`)."""
    prompts = _prompt_files(tmp_path, make_prompt_text)
    _trainer(_config(tmp_path, prompts, episodes=16), make_tokenizer, "cuda").run()
    resumed = _trainer(_config(tmp_path, prompts, resume=True), make_tokenizer, "cuda")
    assert resumed.episodes_done == 16
    resumed.run()
    assert resumed.episodes_done == 32


def test_mixed_episode_lengths(tmp_path, make_tokenizer, make_prompt_text, monkeypatch):
    from mara_serve.training import trainer as trainer_module

    budgets = []
    real = trainer_module.collect_episodes

    def spy(engine, actor, prompts, ids, params, *rest):
        budgets.extend(p.max_new_tokens for p in params)
        return real(engine, actor, prompts, ids, params, *rest)

    monkeypatch.setattr(trainer_module, "collect_episodes", spy)
    cfg = _config(tmp_path, _prompt_files(tmp_path, make_prompt_text), episode_lengths=(2, 6))
    _trainer(cfg, make_tokenizer).run()
    assert len(budgets) == 32 and set(budgets) == {2, 6}


def test_an_existing_run_needs_resume_and_resume_needs_a_checkpoint(
    tmp_path, make_tokenizer, make_prompt_text
):
    prompts = _prompt_files(tmp_path, make_prompt_text)
    with pytest.raises(TrainingError, match="no checkpoint"):
        _trainer(_config(tmp_path, prompts, out="c", resume=True), make_tokenizer)
    _trainer(_config(tmp_path, prompts, out="d", episodes=8), make_tokenizer).run()
    with pytest.raises(TrainingError, match="--resume"):
        _trainer(_config(tmp_path, prompts, out="d"), make_tokenizer)


def test_unlabelled_prompts_with_the_refusal_reward_fail_before_the_model_loads(
    tmp_path, make_prompt_text
):
    f = tmp_path / "plain.json"
    f.write_text(json.dumps([{"instruction": make_prompt_text(1)}]))
    cfg = _config(tmp_path, (str(f),), model=ModelConfig(model=str(tmp_path / "no-model")))
    with pytest.raises(PromptFileError, match="labels"):
        Trainer(cfg)


def test_prompt_baseline_centres_rewards_on_the_agents_own_episodes():
    from mara_serve.training.episodes import Episode
    from mara_serve.training.rewards import centre_by_prompt

    def ep(text, guided=0):
        return Episode(Prompt(text), [], "", "stop", guided_tokens=guided)

    eps = [ep("a", 3), ep("a"), ep("a"), ep("a"), ep("b"), ep("c"), ep("c"), ep("d", 2)]
    out = centre_by_prompt(eps, [1.0, -1.0, -1.0, 1.0, 0.5, 2.0, 2.0, 1.0])
    # a: the guided refusal (+1) against the agent's own answers (mean −1/3), and each own
    # answer against the other own answers only; b, d: no siblings to compare with
    assert out == pytest.approx([4 / 3, -1.0, -1.0, 2.0, 0.5, 0.0, 0.0, 1.0])


def test_actor_can_start_near_a_given_accept_probability():
    from mara_serve.training.sac import DiscreteSAC

    torch.manual_seed(0)
    sac = DiscreteSAC(64, SACConfig(inner_dim=64, init_accept_prob=0.9))
    with torch.no_grad():
        p = torch.softmax(sac.actor(torch.randn(256, 64)), -1)[:, 1]
    assert 0.8 < float(p.mean()) < 0.95
    with pytest.raises(ValueError):
        DiscreteSAC(64, SACConfig(inner_dim=64, init_accept_prob=1.0))

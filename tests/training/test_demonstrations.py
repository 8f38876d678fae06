"""Reward-filtered demonstrations before SAC: the demonstrating agents, the reward's choice,
behaviour cloning, and the trainer's demonstration phase (with resume)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_models import last_hidden, random_prompts
from training.support import _config, _prompt_files, _trainer

from mara_serve.engine.agent import Agent, AgentCard, AgentNetwork
from mara_serve.engine.candidates import select_candidates
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams
from mara_serve.training.data import Prompt
from mara_serve.training.demonstrations import (
    DemoAgent,
    Demonstrations,
    behaviour_clone,
    choose,
)
from mara_serve.training.episodes import run_episodes
from mara_serve.training.rewards import Reward


def _names(ids):
    return " ".join(f"w{t}" for t in ids)


def test_own_episode_is_the_greedy_answer_and_guided_one_ends_at_the_first_end_token(tiny_lm):
    def cands(ids):
        return select_candidates(tiny_lm.model.lm_head(last_hidden(tiny_lm, ids))).token_ids

    # a prompt whose first step offers ≥ 4 candidates and, after the rank-3 one, ≥ 3
    prompt = next(p for p in random_prompts(50, seed=5)
                  if len(cands(p)) >= 4 and len(cands(p + [int(cands(p)[3])])) >= 3)  # fmt: skip
    plain = LLMEngine(tiny_lm).generate(
        [Request("g", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0))]
    )["g"][0]
    a = int(cands(prompt)[3])  # the guide: rank 3 at the first step
    end = int(cands(prompt + [a])[2])  # an "end token" the model offers right after the guide
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2, chunk_size=2))
    agents = [DemoAgent(64, g, lambda t: f"w{t}", (end,)) for g in (None, f"w{a}")]
    own, guided = run_episodes(
        engine, [Prompt("p")] * 2, [prompt] * 2,
        SamplingParams(max_new_tokens=6, ignore_eos=True), agents, _names,
    )  # fmt: skip
    assert own.token_ids == plain and own.guided_tokens == 0
    assert all(len(d.states) == 1 for d in own.decisions)  # top-1, accepted at once
    assert guided.token_ids[:2] == [a, end] and guided.guided_tokens == 1
    assert len(guided.decisions[0].states) == 4  # ranks 0-2 rejected, rank 3 accepted
    assert len(guided.decisions[1].states) == 3  # ranks 0-1 rejected, the end token accepted


@pytest.mark.parametrize(
    "own, guided, pick",
    [(1, -1, "own"), (-1, 1, "guided"), (1, 1, "own"), (-1, -1, None), (-0.5, 0.0, "guided")],
)
def test_the_reward_picks_the_demonstration(own, guided, pick):
    assert choose(own, guided, min_reward=0.0) == pick


def test_behaviour_cloning_fits_held_out_states():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(2, 16, generator=g) * 3
    labels = torch.randint(0, 2, (400,), generator=g)
    states = centre[labels] + torch.randn(400, 16, generator=g)
    held = torch.arange(400) % 10 == 9
    torch.manual_seed(0)
    actor = AgentNetwork(16, 32)
    fit = behaviour_clone(actor, Demonstrations(states, labels, held), 10, 1e-3, 32, g)
    assert fit["validation_pairs"] == 40 and fit["pairs"] == 360
    assert fit["validation"]["accuracy"] > 0.95 and fit["last_loss"] < fit["first_loss"]


class _StartsWith(Reward):
    """Harmful prompts should answer starting with `w{token}`, benign ones not."""

    needs_labels = True

    def __init__(self, token: int):
        self.text = f"w{token}"

    def __call__(self, prompt: Prompt, response: str) -> float:
        hit = response.startswith(self.text)
        return 1.0 if hit == (prompt.label == "harmful") else -1.0


def test_the_trainer_clones_the_rewards_choice_then_resumes_without_demonstrating_again(
    tmp_path, make_tokenizer, make_prompt_text, monkeypatch
):
    prompts = _prompt_files(tmp_path, make_prompt_text)
    target = 21  # a first-step candidate of about half the synthetic prompts
    cfg = _config(
        tmp_path, prompts, demonstrations=20, episodes=8, guide_text=f"w{target}",
        bc_epochs=60, chunk_size=4, max_prompt_tokens=64,
    )  # fmt: skip
    trainer = _trainer(cfg, make_tokenizer)
    trainer.reward = _StartsWith(target)
    summary = trainer.demonstrate()
    kept = summary["kept"]
    assert kept["guided"] > 0 and kept["own"] > 0 and summary["prompts"] == 20
    assert summary["behaviour_cloning"]["fit"]["accuracy"] > 0.9
    assert len(trainer.replay) > 0  # both episodes of every prompt seed the buffer

    # The cloned actor, served greedily, now answers as the reward asked: harmful prompts
    # start with the target wherever the model offers it, benign ones where it is not top-1.
    lm, tok = trainer.lm, trainer.lm.tokenizer
    cases = []
    for i in list(range(10)) + list(range(100, 110)):
        ids = trainer._ids(make_prompt_text(i))
        offered = select_candidates(lm.model.lm_head(last_hidden(lm, ids))).token_ids.tolist()
        if i < 100 and target in offered:
            cases.append((ids, True))
        elif i >= 100 and offered[0] != target:
            cases.append((ids, False))

    def right(actor) -> int:
        agent = Agent(actor, AgentCard("cloned", 64, 64))
        out = LLMEngine(lm).generate(
            [Request(str(j), ids, SamplingParams(max_new_tokens=3), agent)
             for j, (ids, _) in enumerate(cases)]
        )  # fmt: skip
        return sum(
            tok.decode(out[str(j)][0]).startswith(f"w{target}") == want
            for j, (_, want) in enumerate(cases)
        )

    torch.manual_seed(0)
    before = right(AgentNetwork(64, 64))  # the actor as it started (same initialisation)
    after = right(trainer.sac.actor)
    assert sum(w for _, w in cases) >= 3 and after >= len(cases) - 2 and after > before + 2, (
        before, after, len(cases))  # fmt: skip

    trainer.save_checkpoint()
    card = json.loads((cfg.out_dir / "agent.json").read_text())
    assert card["demonstrations"]["kept"] == kept
    assert card["hyperparameters"]["demonstrations"] == 20
    assert json.loads((cfg.out_dir / "demonstrations.json").read_text())["kept"] == kept

    monkeypatch.setattr(type(trainer), "demonstrate", lambda self: pytest.fail("demonstrated"))
    resumed = _trainer(dataclasses.replace(cfg, resume=True), make_tokenizer)
    resumed.reward = _StartsWith(target)
    assert resumed.demo_summary == summary
    resumed.run()
    assert resumed.episodes_done == 8


@pytest.mark.parametrize(
    "settings, message",
    [({"demonstrations": 4}, "guide-text"),
     ({"demonstrations": -1, "guide_text": "w7"}, ">= 0"),
     ({"demonstrations": 4, "guide_text": "w7", "bc_epochs": 0}, "bc-epochs")],
)  # fmt: skip
def test_bad_demonstration_settings_fail_before_the_model_loads(
    tmp_path, make_prompt_text, monkeypatch, settings, message
):
    from mara_serve.training import trainer as trainer_module
    from mara_serve.training.trainer import Trainer, TrainingError

    monkeypatch.setattr(trainer_module, "load_model", lambda cfg: pytest.fail("model loaded"))
    cfg = _config(tmp_path, _prompt_files(tmp_path, make_prompt_text), **settings)
    with pytest.raises(TrainingError, match=message):
        Trainer(cfg)

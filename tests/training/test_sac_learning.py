"""SAC actually learns: on a tiny random model, an agent rewarded for never emitting one token
stops emitting it (measured with greedy MARA decoding before and after training)."""

from __future__ import annotations

import collections
import copy
import json

import torch

from mara_serve.engine.agent import Agent, AgentCard
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.loading import render_chat
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams
from mara_serve.training.rewards import Reward
from mara_serve.training.sac import SACConfig
from mara_serve.training.trainer import TrainConfig, Trainer

N_PROMPTS, NEW_TOKENS = 64, 8


class AvoidToken(Reward):
    """+1 for a response without the word `w{token}`, −1 with it."""

    token: int | None = None

    def __call__(self, prompt, response: str) -> float:
        return -1.0 if f"w{self.token}" in response.split() else 1.0


def _emitted(lm, actor, texts) -> collections.Counter:
    """Greedy MARA decoding (threshold 0.5, fallback to the top-1) with a copy of the actor."""
    agent = Agent(copy.deepcopy(actor), AgentCard("probe", lm.hidden_size, 64))
    engine = LLMEngine(lm, EngineConfig(max_running=len(texts)))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [
        Request(str(i), render_chat(lm.tokenizer, [{"role": "user", "content": t}]), params, agent)
        for i, t in enumerate(texts)
    ]
    return collections.Counter(t for ids, _, _ in engine.generate(reqs).values() for t in ids)


def test_agent_learns_to_stop_emitting_a_penalised_token(tiny_lm, tmp_path, make_prompt_text):
    texts = [make_prompt_text(i) for i in range(64)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    torch.manual_seed(0)
    cfg = TrainConfig(
        prompts=(str(prompts),),
        reward="avoid-token",
        out_dir=tmp_path / "run",
        sac=SACConfig(inner_dim=64, batch_size=128, lr_actor=1e-3, lr_critic=1e-3),
        episodes=320,
        episodes_per_iter=16,
        max_new_tokens=8,
        warmup=200,
        updates_per_episode=2,
        checkpoint_every=1000,
        progress=False,
    )
    reward = AvoidToken()
    trainer = Trainer(cfg, lm=tiny_lm, reward=reward)
    held_out = texts[:N_PROMPTS]  # the training prompts: the test is about learning
    before = _emitted(tiny_lm, trainer.sac.actor, held_out)
    reward.token, count_before = before.most_common(1)[0]
    total = sum(before.values())
    assert count_before / total >= 0.03  # the token is common before training

    trainer.run()
    after = _emitted(tiny_lm, trainer.sac.actor, held_out)
    rate_before = count_before / total
    rate_after = after[reward.token] / sum(after.values())
    assert rate_after <= 0.4 * rate_before, (rate_before, rate_after)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward"] > rows[0]["reward"]  # the training reward went up too

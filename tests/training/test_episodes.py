"""Training episodes through the batched engine: the recorded states, the agent's token
distribution, and the transitions built from an episode."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import last_hidden, random_prompts

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams
from mara_serve.training.data import Prompt
from mara_serve.training.episodes import (
    Decision,
    Episode,
    EpisodeAgent,
    _agent_logprob,
    align_decisions,
    collect_episodes,
    episode_transitions,
)
from mara_serve.training.sac import DiscreteSAC, SACConfig


@pytest.mark.parametrize("chunk", [None, 2])
def test_recorded_states_are_the_judged_candidates_states(tiny_lm, chunk):
    """Each decision holds exactly the states of prefix + c_i for the judged candidates."""
    sac = DiscreteSAC(64, SACConfig(inner_dim=64))
    gen = torch.Generator().manual_seed(0)
    agents = [EpisodeAgent(sac.actor, 64, gen) for _ in range(4)]
    prompts = random_prompts(4, seed=1)
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4, chunk_size=chunk))
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    reqs = [
        Request(str(i), p, params, a) for i, (p, a) in enumerate(zip(prompts, agents, strict=True))
    ]
    out = engine.generate(reqs)
    checked = 0
    for req, agent in zip(reqs, agents, strict=True):
        ids, traces, _ = out[req.request_id]
        decisions = align_decisions(traces, agent.calls)
        judged = [t for t in traces if t.num_candidates > 1]
        assert len(decisions) == len(judged)
        it = iter(decisions)
        seq = list(req.prompt_token_ids)
        for tok, trace in zip(ids, traces, strict=True):
            if trace.num_candidates > 1:
                d = next(it)
                assert len(d.states) == trace.evaluated and d.fallback == trace.fallback
                for c, state in zip(trace.candidates, d.states, strict=True):
                    torch.testing.assert_close(
                        state, last_hidden(tiny_lm, seq + [c]), atol=1e-4, rtol=1e-4
                    )
                    checked += 1
            seq.append(tok)
    assert checked > 10


def test_agent_token_distribution_sums_to_one():
    p = torch.tensor([0.3, 0.9, 0.05, 0.5])
    total = sum(math.exp(_agent_logprob(p, r, 4)) for r in range(4))
    assert total == pytest.approx(1.0, abs=1e-9)
    assert _agent_logprob(p, 0, 4) == pytest.approx(math.log(0.3))
    assert _agent_logprob(p, 3, 4) == pytest.approx(math.log(0.7 * 0.1 * 0.95))


def _decision(k: int, fallback: bool, llm: float, top: float) -> Decision:
    return Decision(torch.randn(k, 8), torch.full((k,), 0.5), fallback, math.log(0.5), llm, top)


def test_transitions_carry_fluency_shaping_and_the_propagated_terminal_reward():
    ep = Episode(Prompt("x y z"), [5, 6, 7], "w5 w6 w7", "length", [
        _decision(3, False, 0.1, 0.4), _decision(1, False, 0.9, 0.9), _decision(2, True, 0.05, 0.5),
    ])  # fmt: skip
    tr = episode_transitions(ep, terminal_reward=2.0, kl_coef=0.1, gamma=0.9, propagate=True)
    assert tr.actions.tolist() == [0, 0, 1, 1, 0, 1]  # rejects then the (forced) accept
    assert tr.dones.tolist() == [False] * 5 + [True]
    assert torch.equal(tr.states[:3], ep.decisions[0].states)
    shaping = [-0.1 * math.log(0.4 / 0.1), 0.0, -0.1 * math.log(0.5 / 0.05)]
    r = [shaping[0] + 1.62, 1.8, shaping[2] + 2.0]  # outcomes 0.9² · 2, 0.9 · 2, 2
    want = [r[0]] * 3 + [r[1]] + [r[2]] * 2  # on every transition of each decision
    assert tr.rewards.tolist() == pytest.approx(want, abs=1e-6)
    plain = episode_transitions(ep, 2.0, 0.1, 0.9, propagate=False)
    want = [shaping[0]] * 3 + [0.0] + [shaping[2], shaping[2] + 2.0]
    assert plain.rewards.tolist() == pytest.approx(want, abs=1e-6)


def test_an_episode_without_decisions_has_no_transitions():
    assert episode_transitions(Episode(Prompt("a"), [1], "", "stop"), 1.0, 0.1, 0.99, True) is None


def test_collect_episodes_runs_many_prompts_in_one_batch(tiny_lm):
    sac = DiscreteSAC(64, SACConfig(inner_dim=64))
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=6))
    prompts = [Prompt(f"p{i}", "benign") for i in range(6)]
    episodes = collect_episodes(
        engine,
        sac.actor,
        prompts,
        random_prompts(6, 2),
        SamplingParams(max_new_tokens=4),
        torch.Generator(),
        str,
    )
    assert [e.prompt for e in episodes] == prompts
    assert all(1 <= len(e.token_ids) <= 4 and e.response == str(e.token_ids) for e in episodes)
    assert sum(e.judged for e in episodes) > 0


def test_a_guide_steers_the_episode_through_the_models_own_candidates(tiny_lm):
    from mara_serve.engine.candidates import select_candidates

    prompt = random_prompts(1, seed=3)[0]
    first = select_candidates(
        tiny_lm.model.lm_head(last_hidden(tiny_lm, prompt))
    ).token_ids.tolist()
    a = first[2]  # not the top-1: the guide must make the agent reject ranks 0 and 1
    second = select_candidates(tiny_lm.model.lm_head(last_hidden(tiny_lm, prompt + [a])))
    b = second.token_ids.tolist()[1]
    text = {a: f"<{a}>", b: f"<{b}>"}
    sac = DiscreteSAC(64, SACConfig(inner_dim=64))
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2, chunk_size=1))  # one per round
    eps = collect_episodes(
        engine, sac.actor, [Prompt("g"), Prompt("free")], [prompt, prompt],
        SamplingParams(max_new_tokens=5, ignore_eos=True), torch.Generator().manual_seed(0),
        lambda ids: "".join(text.get(t, f"[{t}]") for t in ids), [f"<{a}><{b}> and more", None],
    )  # fmt: skip
    guided, free = eps
    assert guided.token_ids[:2] == [a, b] and guided.guided_tokens == 2
    assert free.guided_tokens == 0
    d = guided.decisions[0]
    assert len(d.states) == 3 and not d.fallback  # rejected ranks 0 and 1, accepted rank 2
    tr = episode_transitions(guided, 1.0, 0.1, 0.99, True)
    assert tr.actions[:3].tolist() == [0, 0, 1]

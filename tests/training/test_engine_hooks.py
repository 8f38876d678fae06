"""Engine features training relies on: `fallback_last` agents and shared prefill of identical
prompts admitted together (repeated episodes of one prompt)."""

from __future__ import annotations

import pytest
from tiny_models import last_hidden, make_agent, random_prompts

from mara_serve.engine.candidates import select_candidates
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams


@pytest.mark.parametrize("chunk", [None, 3])
def test_fallback_last_emits_the_last_candidate(tiny_lm, chunk):
    agent = make_agent("reject", lm=tiny_lm)
    agent.fallback_last = True
    prompts = random_prompts(3)
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=3, chunk_size=chunk))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    out = engine.generate([Request(str(i), p, params, agent) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        ids, traces, _ = out[str(i)]
        seq = list(prompt)
        for tok, trace in zip(ids, traces, strict=True):  # serial: the last candidate each step
            logits = tiny_lm.model.lm_head(last_hidden(tiny_lm, seq))
            cands = select_candidates(logits).token_ids.tolist()
            assert tok == cands[-1]
            assert trace.accepted_rank == len(cands) - 1
            assert trace.fallback == (len(cands) > 1)
            seq.append(tok)


def test_identical_prompts_admitted_together_share_one_prefill(tiny_lm, monkeypatch):
    agent = make_agent("half", lm=tiny_lm)
    a, b = random_prompts(2, seed=5)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)
    alone = {}
    for key, prompt, ag in (("a-mara", a, agent), ("a-plain", a, None), ("b", b, agent)):
        ids, _, _ = LLMEngine(tiny_lm, EngineConfig(max_running=1)).generate(
            [Request(key, prompt, params, ag)]
        )[key]
        alone[key] = ids
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=5))
    calls = []
    prefill = engine.runner.prefill
    monkeypatch.setattr(
        engine.runner,
        "prefill",
        lambda slot, ids, start=0: calls.append(slot) or prefill(slot, ids, start),
    )
    reqs = [
        Request("1", a, params, agent),
        Request("2", a, params, None),
        Request("3", b, params, agent),
        Request("4", a, params, agent),
        Request("5", list(a), params, agent),
    ]
    out = engine.generate(reqs)
    assert len(calls) == 2  # a and b once each
    assert out["1"][0] == out["4"][0] == out["5"][0] == alone["a-mara"]
    assert out["2"][0] == alone["a-plain"] and out["3"][0] == alone["b"]

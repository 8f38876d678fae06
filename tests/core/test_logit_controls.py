"""Logit controls (penalties, logit_bias, min_tokens) apply before candidate selection, per
request: the engine's tokens equal the serial reference's under the same controls, for plain
and MARA rows batched together, and each control has its effect."""

from __future__ import annotations

import pytest
from tiny_models import tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.errors import InvalidRequestError
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams

EOS = 1
LEAN = ((7, 12.0),)  # a bias that makes the tiny model repeat token 7 (the penalties' target)
CONTROLS = {
    "lean": dict(logit_bias=LEAN),
    "presence": dict(presence_penalty=2.0, logit_bias=LEAN),
    "frequency": dict(frequency_penalty=2.0, logit_bias=LEAN),
    "repetition": dict(repetition_penalty=3.0, logit_bias=LEAN),
    "bias": dict(logit_bias=((7, 20.0), (124, -100.0))),
    "min_tokens": dict(min_tokens=6, logit_bias=((EOS, 100.0),)),
    "allowed": dict(allowed_token_ids=(3, 5, 7, EOS)),
    "all": dict(presence_penalty=-0.5, frequency_penalty=0.7, repetition_penalty=1.2,
                logit_bias=((3, 2.0),)),
}  # fmt: skip


def test_controls_match_the_reference_batched_with_neighbours(agents):
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=16))
    reqs = []
    for name, controls in CONTROLS.items():
        for mode in ("half", None):
            params = SamplingParams(max_new_tokens=12, temperature=0.0, **controls)
            reqs.append(Request(f"{name}-{mode}", [0, 17, 17, 5, 17], params,
                                agents[mode] if mode else None))  # fmt: skip
    reqs.append(Request("none", [0, 17, 17, 5, 17], SamplingParams(max_new_tokens=12,
                                                                   temperature=0.0)))  # fmt: skip
    results = engine.generate(reqs)
    for r in reqs:
        want, _ = reference_generate(lm.model, r.prompt_token_ids, r.agent, r.params, (EOS,))
        assert results[r.request_id][0] == want, r.request_id
    plain, lean = results["none"][0], results["lean-None"][0]
    assert plain[0] == 124 and results["bias-None"][0] == [7] * 12  # +20 wins, -100 never
    assert lean.count(7) >= 6
    # min_tokens: EOS is the top token everywhere (+100) but cannot come before 6 tokens
    ids, _, reason = results["min_tokens-None"]
    assert len(ids) == 7 and ids[-1] == EOS and EOS not in ids[:-1] and reason == "stop"
    assert set(results["allowed-None"][0]) <= {3, 5, 7, EOS}
    assert set(results["allowed-half"][0]) <= {3, 5, 7, EOS}
    for name in ("presence", "frequency", "repetition"):  # each penalty breaks the repetition
        assert results[f"{name}-None"][0].count(7) < lean.count(7), name


def test_invalid_controls_are_refused_with_the_field():
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=2))
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(Request("x", [0, 5], SamplingParams(4, logit_bias=((10**6, 1.0),))))
    assert e.value.param == "logit_bias"
    for bad, field in ((dict(presence_penalty=3.0), "presence_penalty"),
                       (dict(repetition_penalty=0.0), "repetition_penalty"),
                       (dict(min_tokens=9, max_new_tokens=4), "min_tokens"),
                       (dict(logit_bias=((3, 500.0),)), "logit_bias")):  # fmt: skip
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**bad)
        assert e.value.param == field


def test_min_p_filters_sampling_and_candidates(agents):
    import torch

    from mara_serve.engine.candidates import select_candidates

    lm = tiny_llama()
    prompt = [0, 5, 6, 7]
    # plain: min_p = 1 keeps only the most likely token, so sampling is greedy whatever the seed
    engine = LLMEngine(lm, EngineConfig(max_running=4))
    greedy = engine.generate(
        [Request("g", prompt, SamplingParams(max_new_tokens=8, temperature=0.0))]
    )["g"][0]
    for seed in range(3):
        sampled = engine.generate([Request("s", prompt, SamplingParams(
            max_new_tokens=8, temperature=1.5, min_p=1.0, seed=seed))])["s"][0]  # fmt: skip
        assert sampled == greedy
    # MARA: the candidate list keeps only candidates >= min_p x the top one's probability
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt])).logits[0, -1]
    full = select_candidates(logits, 40, 1.0)
    cut = select_candidates(logits, 40, 1.0, min_p=0.3)
    assert 1 <= len(cut) < len(full)
    assert torch.all(cut.probs >= 0.3 * cut.probs[0] - 1e-7)
    assert cut.token_ids.tolist() == full.token_ids[: len(cut)].tolist()
    # and the engine follows the reference with it
    params = SamplingParams(max_new_tokens=10, temperature=0.0, min_p=0.2)
    got = engine.generate([Request("m", prompt, params, agents["half"])])["m"][0]
    assert got == reference_generate(lm.model, prompt, agents["half"], params, (1,))[0]


def test_bad_words_ban_a_sequences_last_token_after_the_rest(agents):
    lm = tiny_llama()
    prompt = [0, 5, 6, 7]
    engine = LLMEngine(lm, EngineConfig(max_running=2))

    def run(bad, agent=None):
        params = SamplingParams(max_new_tokens=8, temperature=0.0, bad_words_ids=bad)
        got = engine.generate([Request("b", prompt, params, agent)])["b"][0]
        assert got == reference_generate(lm.model, prompt, agent, params, (1,))[0]
        return got

    greedy = run(())
    one = run(((greedy[0],),))  # a one-token word is never generated
    assert greedy[0] not in one
    two = run(((greedy[0], greedy[1]),))  # the first token stays; after it, not the second
    assert two[0] == greedy[0] and two[1] != greedy[1]
    mara = run(((greedy[0],),), agents["half"])  # MARA: never a candidate either
    assert greedy[0] not in mara

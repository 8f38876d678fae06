"""The batched engine emits exactly the serial reference's tokens (docs/algorithm.md §8)."""

import pytest
import torch
from tiny_models import PARITY_PROMPTS as PROMPTS
from tiny_models import tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import ModelRunner
from mara_serve.engine.sampling import SamplingParams


def reference(lm, prompt, agent, params):
    return reference_generate(lm.model, prompt, agent, params, lm.eos_token_ids)


def test_tree_masked_states_equal_separate_forwards(tiny_lm):
    runner = ModelRunner(tiny_lm, max_slots=2)
    prompts, cands = [[0, 5, 6, 7, 8], [0, 9, 10]], [[3, 9, 27, 81], [44, 45]]
    for slot, p in enumerate(prompts):
        runner.prefill(slot, p)
    tokens = torch.tensor(cands[0] + cands[1])
    row_of, col_of = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1])
    hidden = runner.forward_tokens(2, torch.tensor([5, 3]), tokens, row_of, col_of, 4)
    n = 0
    for p, cs in zip(prompts, cands, strict=True):
        for c in cs:
            with torch.inference_mode():
                want = tiny_lm.model.model(torch.tensor([p + [c]])).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[n], want, atol=1e-5, rtol=1e-5)
            n += 1


ALL = 256  # a chunk at least top_k: every candidate in one forward


@pytest.mark.parametrize("mode", ["accept", "reject", "half"])
@pytest.mark.parametrize("chunk_size", [ALL, 3, None])
def test_batch_of_one_equals_reference(tiny_lm, agents, mode, chunk_size):
    params = SamplingParams(max_new_tokens=24)
    config = EngineConfig(max_running=1, chunk_size=chunk_size, probe_top1=False)
    engine = LLMEngine(tiny_lm, config)
    for i, prompt in enumerate(PROMPTS[:3]):
        got = engine.generate([Request(str(i), prompt, params, agents[mode])])[str(i)]
        want_ids, want_traces = reference(tiny_lm, prompt, agents[mode], params)
        assert got[0] == want_ids
        assert [t.accepted_rank for t in got[1]] == [t.accepted_rank for t in want_traces]
        assert [t.fallback for t in got[1]] == [t.fallback for t in want_traces]
        assert [t.candidates for t in got[1]] == [t.candidates for t in want_traces]


@pytest.mark.parametrize("defer", [False, True])
def test_rest_at_once_judges_in_two_rounds_at_most(tiny_lm, agents, defer):
    """The GPU policy: a row whose first chunk is all rejected gets all the rest next round;
    same tokens as the reference. Rounds within a step: never more than two forwards a step;
    deferred rounds (`defer_undecided`): one forward a step, two steps a token at most."""
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4, chunk_size=2, probe_top1=False,
                                             rest_at_once=True, defer_undecided=defer))  # fmt: skip
    forwards, score = [], engine.runner.score
    engine.runner.score = lambda *a: forwards.append(engine.num_steps) or score(*a)
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    modes = ["reject", "half", "reject", "half"]
    reqs = [Request(str(i), PROMPTS[i], params, agents[m]) for i, m in enumerate(modes)]
    got = engine.generate(reqs)
    for r in reqs:
        assert got[r.request_id][0] == reference(tiny_lm, r.prompt_token_ids, r.agent, params)[0]
    per_step = [forwards.count(s) for s in set(forwards)]
    assert max(per_step) == (1 if defer else 2)  # rejecting rows took a second round
    if defer:  # the reject-all rows' 12 tokens: two steps each (2 candidates, then the rest)
        # until they have fallen back often enough to judge everything at once (step.py)
        assert 12 + 1 < engine.num_steps <= 24 + 1, engine.num_steps


@pytest.mark.parametrize(
    ("chunk_size", "probe_top1"), [(ALL, True), (ALL, False), (4, False), (None, None)]
)
def test_batch_of_eight_with_requests_joining_at_different_steps(
    tiny_lm, agents, chunk_size, probe_top1
):
    """Mixed agents (and a plain greedy row), different prompt lengths, staggered arrivals."""
    config = EngineConfig(max_running=8, chunk_size=chunk_size, probe_top1=probe_top1)
    engine = LLMEngine(tiny_lm, config)
    modes = ["half", "accept", "reject", None, "half", "reject", "half", "accept"]
    reqs = []
    for i, (prompt, mode) in enumerate(zip(PROMPTS, modes, strict=True)):
        params = SamplingParams(max_new_tokens=10 + 3 * i, temperature=0.0)
        reqs.append(Request(str(i), prompt, params, agents[mode] if mode else None))
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    step, pending = 0, list(reqs)
    while pending or engine.has_work():
        if pending and step % 2 == 0:  # a new request joins every other step
            engine.add_request(pending.pop(0))
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        step += 1
    for r in reqs:
        want, _ = reference(tiny_lm, r.prompt_token_ids, r.agent, r.params)
        assert got[r.request_id] == want, f"request {r.request_id} ({modes[int(r.request_id)]})"


def test_more_requests_than_slots_queue_and_still_match(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=3))
    params = SamplingParams(max_new_tokens=12)
    reqs = [Request(str(i), p, params, agents["half"]) for i, p in enumerate(PROMPTS)]
    results = engine.generate(reqs)
    for r in reqs:
        assert (
            results[r.request_id][0] == reference(tiny_lm, r.prompt_token_ids, r.agent, params)[0]
        )
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_per_request_top_k_top_p_are_honoured(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    a = SamplingParams(max_new_tokens=15, top_k=3, top_p=1.0)
    b = SamplingParams(max_new_tokens=15, top_k=40, top_p=0.5)
    res = engine.generate([Request("a", PROMPTS[0], a, agents["reject"]),
                           Request("b", PROMPTS[0], b, agents["half"])])  # fmt: skip
    assert all(t.num_candidates <= 3 for t in res["a"][1])
    assert res["a"][0] == reference(tiny_lm, PROMPTS[0], agents["reject"], a)[0]
    assert res["b"][0] == reference(tiny_lm, PROMPTS[0], agents["half"], b)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_engine_matches_reference_in_float32(agents):
    lm = tiny_llama(device="cuda")
    agent = agents["half"]
    agent.to("cuda")
    try:
        engine = LLMEngine(lm, EngineConfig(max_running=4))
        params = SamplingParams(max_new_tokens=16)
        reqs = [Request(str(i), p, params, agent) for i, p in enumerate(PROMPTS[:4])]
        results = engine.generate(reqs)
        for r in reqs:
            assert results[r.request_id][0] == reference(lm, r.prompt_token_ids, agent, params)[0]
    finally:
        agent.to("cpu")

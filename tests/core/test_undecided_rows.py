"""Undecided rows (`EngineConfig.defer_undecided`, step.py): one forward per engine step; a row
whose candidates were all rejected emits nothing that step and goes on in the next one, while
the other rows keep emitting. The tokens stay the serial reference's."""

from tiny_models import PARITY_PROMPTS as PROMPTS

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams


def reference(lm, request):
    return reference_generate(lm.model, request.prompt_token_ids, request.agent, request.params,
                              lm.eos_token_ids)[0]  # fmt: skip


def run(engine):
    got, emitted_per_step = {}, []
    while engine.has_work():
        running = engine.num_running + engine.num_waiting
        outs = engine.step()
        got.update({o.request_id: got.get(o.request_id, []) + o.new_token_ids for o in outs})
        emitted_per_step.append((running, sum(1 for o in outs if o.new_token_ids)))
    return got, emitted_per_step


def test_a_rejecting_row_does_not_hold_the_batch(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4, chunk_size=2, probe_top1=False))
    forwards, score = [], engine.runner.score
    engine.runner.score = lambda *a: forwards.append(engine.num_steps) or score(*a)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.0)
    modes = ["accept", "half", "reject", None]
    reqs = [Request(str(i), PROMPTS[i], params, m and agents[m]) for i, m in enumerate(modes)]
    for r in reqs:
        engine.add_request(r)
    got, emitted = run(engine)
    for r in reqs:
        assert got[r.request_id] == reference(tiny_lm, r), f"request {r.request_id}"
    assert all(forwards.count(s) == 1 for s in set(forwards))  # one forward per step
    # steps where some rows emitted and others (undecided) did not
    assert any(0 < n < running for running, n in emitted[1:]), emitted


def test_an_undecided_row_moved_to_another_slot_keeps_its_fallback(tiny_lm, agents):
    """When a row ends, the last row moves into its slot. An undecided row must take its
    rank-0 K/V (position `length`, its fallback) along: its later tokens attend to it."""
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2, chunk_size=1, probe_top1=False))
    short = Request("short", PROMPTS[0], SamplingParams(max_new_tokens=2, ignore_eos=True,
                                                        temperature=0.0))  # fmt: skip
    # reject-all, one candidate per step: each of its tokens takes top_k steps, then falls back
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, top_k=8)
    rejecting = Request("rejecting", PROMPTS[1], params, agents["reject"])
    engine.add_request(short)
    engine.add_request(rejecting)
    got, _ = run(engine)
    assert len(got["short"]) == 2 and len(got["rejecting"]) == 6
    # "short" ended (slot 0 freed) while "rejecting" (slot 1) was undecided
    assert engine.num_steps > 8
    assert got["rejecting"] == reference(tiny_lm, rejecting)

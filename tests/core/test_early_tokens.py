"""Tokens decided before the forward (engine.py `_plan`): a plain row's token is sampled from the
previous forward's logits, so it is handed out before the step's forward, which only computes
what comes after it. A plain request's first token leaves right after its prefill, and a
request that ends on such a token runs no forward for it."""

import asyncio
import threading

import pytest
import torch
from tiny_models import PARITY_PROMPTS as PROMPTS

from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams


def reference(lm, request):
    return reference_generate(lm.model, request.prompt_token_ids, request.agent, request.params,
                              lm.eos_token_ids)[0]  # fmt: skip


def counting_forwards(engine: LLMEngine) -> list[int]:
    """Counts the engine's decode forwards (prefill excluded)."""
    forwards, score = [], engine.runner.score
    engine.runner.score = lambda *a: forwards.append(1) or score(*a)
    return forwards


def test_plain_tokens_are_handed_out_before_the_forward_and_agent_tokens_after(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4))
    forwards = counting_forwards(engine)
    early: list[tuple[int, str, list[int]]] = []  # (forwards run so far, request, tokens)
    engine.on_decided = lambda outs: early.extend(
        (len(forwards), o.request_id, o.new_token_ids) for o in outs
    )
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)
    plain = Request("plain", PROMPTS[0], greedy)
    mara = Request("mara", PROMPTS[1], greedy, agents["half"])
    # one candidate per token (no choice for the agent): still sent after the forward, so a
    # MARA request keeps one cadence
    one = Request("one", PROMPTS[2], SamplingParams(max_new_tokens=6, ignore_eos=True, top_k=1),
                  agents["half"])  # fmt: skip
    for r in (plain, mara, one):
        engine.add_request(r)
    got: dict[str, list[int]] = {"plain": [], "mara": [], "one": []}
    step = 0
    while engine.has_work():
        before = len(forwards)
        for out in engine.step():
            assert out.request_id != "plain"  # the plain row's outputs all went out early
            got[out.request_id] += out.new_token_ids
        step_early = [e for e in early if e[0] == before]
        if step < 6:  # every step hands the plain row's token out before its forward
            assert [(e[1], len(e[2])) for e in step_early] == [("plain", 1)], (step, early)
        step += 1
    got["plain"] = [t for _, rid, ids in early if rid == "plain" for t in ids]
    assert got["plain"] == reference(tiny_lm, plain)
    assert got["mara"] == reference(tiny_lm, mara)
    assert got["one"] == reference(tiny_lm, one)
    # the first token left after the prefill only: no decode forward had run
    assert early[0] == (0, "plain", got["plain"][:1])


def test_a_request_ending_on_a_decided_token_runs_no_forward_for_it(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    forwards = counting_forwards(engine)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, temperature=0.0)
    req = Request("one", PROMPTS[0], params)
    engine.add_request(req)
    outs = [o for _ in range(3) if engine.has_work() for o in engine.step()]
    assert not engine.has_work() and engine.num_running == 0
    assert forwards == []  # the prefill's logits decided it; nothing more to compute
    (out,) = outs
    assert out.finished and out.finish_reason == "length" and out.num_generated_tokens == 1
    assert out.new_token_ids == reference(tiny_lm, req)
    # three tokens: forwards for the first two only
    req3 = Request("three", PROMPTS[0], SamplingParams(max_new_tokens=3, ignore_eos=True,
                                                       temperature=0.0))  # fmt: skip
    got = engine.generate([req3])["three"][0]
    assert got == reference(tiny_lm, req3) and len(forwards) == 2


def test_rows_ending_before_the_forward_leave_it_over_dense_slots(tiny_lm):
    """A row that ends on a decided token is released before the forward, so the rows still
    running keep slots 0..R-1 (the forward reads a view of the cache, no gather of K/V)."""
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4))
    slots_seen, score = [], engine.runner.score
    engine.runner.score = lambda slots, *a: slots_seen.append(list(slots)) or score(slots, *a)
    reqs = [
        Request(str(i), PROMPTS[i], SamplingParams(max_new_tokens=n, ignore_eos=True,
                                                   temperature=0.0))
        for i, n in enumerate([2, 7, 3, 5])
    ]  # fmt: skip
    got = engine.generate(reqs)
    for r in reqs:
        assert got[r.request_id][0] == reference(tiny_lm, r), r.request_id
    assert [len(s) for s in slots_seen] == [4, 3, 2, 2, 1, 1]  # rows leave before a forward
    assert all(s == list(range(len(s))) for s in slots_seen), slots_seen


def run_sampled(tiny_lm, fail_batches: int) -> tuple[dict[str, list[int]], dict]:
    """Three seeded sampled plain requests; the first `fail_batches` batched forwards fail."""
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=3))
    score, failed = engine.runner.score, []

    def flaky(slots, *a):
        if len(slots) > 1 and len(failed) < fail_batches:
            failed.append(1)
            raise RuntimeError("transient fault (simulated)")
        return score(slots, *a)

    engine.runner.score = flaky
    sent: dict[str, list[int]] = {}
    finals = {}

    def on_decided(outs):
        for o in outs:
            sent.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finals[o.request_id] = o

    engine.on_decided = on_decided
    for i in range(3):
        params = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=i)
        engine.add_request(Request(str(i), PROMPTS[i], params))
    while engine.has_work():
        assert engine.step() == []  # plain tokens all go out before the forward
        for seq in engine.running:  # what was sent is what the row decodes from
            assert seq.output_ids == sent[seq.request_id]
    assert len(failed) == fail_batches
    assert all(finals[r].finish_reason == "length" for r in "012")
    assert all(finals[r].num_generated_tokens == len(sent[r]) == 8 for r in "012")
    return sent


def test_a_retried_step_forwards_the_tokens_it_already_handed_out(tiny_lm):
    """A batch forward fails; each row is then stepped alone from the same plan. Its token was
    sent before the forward, so the retry must forward that token, not draw another: the
    outputs equal a run without faults."""
    assert run_sampled(tiny_lm, fail_batches=2) == run_sampled(tiny_lm, fail_batches=0)


def test_the_async_engine_streams_a_decided_token_while_the_forward_runs(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    in_forward, release = threading.Event(), threading.Event()
    score = engine.runner.score

    def held(*a):
        in_forward.set()
        assert release.wait(10)
        return score(*a)

    engine.runner.score = held
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def first_token():
        params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.0)
        stream = async_engine.add_request(Request("r", PROMPTS[0], params))
        # the forward after the prefill blocks until `release`: the token arrives before it ends
        outs = await asyncio.wait_for(stream.get(), 10)
        assert in_forward.wait(10)  # the forward is running (or about to) while we hold it
        release.set()
        ids = [t for o in outs for t in o.new_token_ids]
        while not stream.finished:
            ids += [t for o in await asyncio.wait_for(stream.get(), 10) for t in o.new_token_ids]
        return ids

    try:
        ids = asyncio.run(first_token())
    finally:
        release.set()
        async_engine.shutdown()
    assert ids == reference(tiny_lm, Request("r", PROMPTS[0], SamplingParams(
        max_new_tokens=4, ignore_eos=True, temperature=0.0)))  # fmt: skip


def test_a_neighbour_failing_its_planning_changes_no_seeded_draw(tiny_lm):
    """Plain rows sample while the step is planned; when one row's sampling fails, the rows
    are planned again one by one from their generators' states before the step."""

    def run(with_faulty: bool):
        engine = LLMEngine(tiny_lm, EngineConfig(max_running=4))
        seeded = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=7)
        reqs = [Request("seeded", PROMPTS[0], seeded)]
        if with_faulty:  # only token 5 allowed and token 5 banned: nothing left to sample
            reqs.append(Request("faulty", PROMPTS[1], SamplingParams(
                max_new_tokens=6, ignore_eos=True, temperature=1.0, allowed_token_ids=(5,),
                bad_words_ids=((5,),))))  # fmt: skip
        return engine.generate(reqs)

    alone, with_faulty = run(False), run(True)
    assert with_faulty["faulty"][2] == "error"
    assert with_faulty["seeded"][0] == alone["seeded"][0]


class RefusingConstraint:
    """Allows every token but refuses the second one it is asked to accept (a broken grammar:
    `allowed` and `accept` disagree)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.accepted = vocab_size, 0

    def allowed(self):
        return torch.ones(self.vocab_size, dtype=torch.bool)

    def accept(self, token_id: int) -> None:
        if self.accepted == 1:
            raise ValueError("token not allowed here")
        self.accepted += 1


def test_a_plain_token_the_constraint_refuses_is_never_sent(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    sent = []
    engine.on_decided = sent.extend
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0)
    engine.add_request(Request("c", PROMPTS[0], params,
                               constraint=RefusingConstraint(tiny_lm.vocab_size)))  # fmt: skip
    while engine.has_work():
        sent += engine.step()
    assert [len(o.new_token_ids) for o in sent] == [1, 0]  # the first token, then the error
    assert sent[-1].finished and sent[-1].finish_reason == "error"
    assert "not allowed" in sent[-1].error and sent[-1].num_generated_tokens == 1


def test_generate_refuses_an_engine_an_async_engine_drives(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    AsyncEngine(engine)  # wires `on_decided`: generate() would lose the early outputs
    with pytest.raises(RuntimeError, match="AsyncEngine"):
        engine.generate([Request("r", PROMPTS[0], SamplingParams(max_new_tokens=2))])


def test_a_step_failing_after_its_tokens_went_out_still_counts_them(tiny_lm):
    """A step that raises past the engine's isolation (the server then fails the running
    requests) has already sent its plain tokens: the error output counts them."""
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    sent = []
    engine.on_decided = sent.extend
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.0)
    engine.add_request(Request("r", PROMPTS[0], params))
    engine.step()
    engine.step()
    engine._decode = lambda plan: (_ for _ in ()).throw(RuntimeError("unisolated fault"))
    with pytest.raises(RuntimeError):
        engine.step()
    (final,) = engine.fail_running("engine step failed: RuntimeError")
    assert sum(len(o.new_token_ids) for o in sent) == 3 == final.num_generated_tokens


def test_a_mara_row_ending_on_its_token_runs_no_lm_head_for_it(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=2))
    heads, logits = [], engine.runner.logits
    engine.runner.logits = lambda hidden: heads.append(hidden.shape[0]) or logits(hidden)
    req = Request("m", PROMPTS[0], SamplingParams(max_new_tokens=3, ignore_eos=True),
                  agents["half"])  # fmt: skip
    got = engine.generate([req])["m"][0]
    assert got == reference(tiny_lm, req)
    assert heads == [1, 1, 1]  # the prefill's and the first two tokens': none for the last


def test_a_new_request_starts_from_its_agents_recent_rates(tiny_lm, agents):
    """`agent_priors`: after an agent has accepted the top-1 again and again, the next request
    of that agent probes the top-1 alone from its first token (neutral rates: a chunk of 4)."""

    def first_rounds(priors: bool) -> list[int]:
        engine = LLMEngine(tiny_lm, EngineConfig(max_running=1, agent_priors=priors))
        sizes, score = [], engine.runner.score
        engine.runner.score = lambda *a: sizes.append(len(a[2])) or score(*a)
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        firsts = []
        for i in range(2):
            req = Request(str(i), PROMPTS[i], params, agents["accept"])
            sizes.clear()
            assert engine.generate([req])[str(i)][0] == reference(tiny_lm, req)
            firsts.append(sizes[0])
        return firsts

    assert first_rounds(priors=False) == [4, 4]
    assert first_rounds(priors=True) == [4, 1]

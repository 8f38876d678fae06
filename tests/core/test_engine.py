"""Engine behaviour: admission, limits, abort, stop tokens, sampling, faults, async face."""

import asyncio
import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_models import last_hidden, tiny_llama

from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.errors import (
    ContextLengthExceededError,
    EngineNotReadyError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
)
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import ModelRunner, _linear
from mara_serve.engine.sampling import SamplingParams
from mara_serve.engine.weights import head_groups, split_weight


def run_all(engine: LLMEngine) -> dict:
    got: dict = {}
    while engine.has_work():
        for out in engine.step():
            ids, finals = got.setdefault(out.request_id, ([], []))
            ids += out.new_token_ids
            if out.finished:
                finals.append(out)
    return got


def test_prompt_plus_max_tokens_beyond_context_is_refused_not_truncated(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig())
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 256"):
        engine.add_request(Request("a", [0] * 200, SamplingParams(max_new_tokens=57)))
    engine.add_request(Request("b", [0] * 200, SamplingParams(max_new_tokens=56)))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(Request("c", [], SamplingParams()))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request(Request("d", [0, 128], SamplingParams()))


def test_bounded_waiting_queue(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=1, max_waiting=2))
    params = SamplingParams(max_new_tokens=8)
    engine.add_request(Request("a", [0, 1], params))
    engine.add_request(Request("b", [0, 1], params))
    with pytest.raises(QueueFullError):
        engine.add_request(Request("c", [0, 1], params))
    engine.step()  # "a" is admitted, which frees a waiting place
    engine.add_request(Request("c", [0, 1], params))


def test_every_request_ends_exactly_once_and_slots_are_freed(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=3))
    for i in range(7):
        engine.add_request(Request(str(i), [0, 5 + i], SamplingParams(max_new_tokens=3 + i),
                                   agents["half"] if i % 2 else None))  # fmt: skip
    got = run_all(engine)
    assert sorted(got) == [str(i) for i in range(7)]
    for ids, finals in got.values():
        assert len(finals) == 1 and finals[0].finish_reason in ("stop", "length")
        assert finals[0].num_generated_tokens == len(ids)
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_abort_waiting_and_running_requests(tiny_lm):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=1))
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)
    engine.add_request(Request("run", [0, 5], params))
    engine.add_request(Request("wait", [0, 6], params))
    engine.step()
    engine.step()
    engine.abort("run")
    engine.abort("wait")
    outs = engine.step()
    reasons = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert reasons == {"run": "abort", "wait": "abort"}
    assert not engine.has_work() and engine.num_running == 0


def test_stop_token_ids_end_generation_with_the_token_included(tiny_lm):
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    free, _ = reference_generate(tiny_lm.model, [0, 5, 6], None, params)
    stop_at = free[4]
    engine = LLMEngine(tiny_lm)
    stopped = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=(stop_at,),
                             ignore_eos=True)  # fmt: skip
    ids, _, reason = engine.generate([Request("s", [0, 5, 6], stopped)])["s"]
    assert reason == "stop" and ids == free[: free.index(stop_at) + 1]


def test_plain_sampling_is_reproducible_with_a_seed_and_independent_of_neighbours(tiny_lm):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=123, ignore_eos=True)
    alone = LLMEngine(tiny_lm).generate([Request("a", [0, 7], params)])["a"][0]
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4))
    other = SamplingParams(max_new_tokens=20, temperature=1.5, seed=9, ignore_eos=True)
    res = engine.generate([Request("x", [0, 9], other), Request("a", [0, 7], params),
                           Request("y", [0, 3, 4], other)])  # fmt: skip
    assert res["a"][0] == alone
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)
    g = LLMEngine(tiny_lm).generate([Request("g", [0, 7], greedy)])["g"][0]
    assert g == reference_generate(tiny_lm.model, [0, 7], None, greedy)[0]
    assert g != alone  # sampling at temperature 1 differs from greedy on this peaked model


def test_trace_is_present_for_every_token(tiny_lm, agents):
    ids, traces, _ = LLMEngine(tiny_lm).generate(
        [Request("t", [0, 5], SamplingParams(max_new_tokens=12), agents["half"])]
    )["t"]
    assert [t.token_id for t in traces] == ids
    for t in traces:
        assert 1 <= t.num_candidates <= 40
        if t.fallback:
            assert t.accepted_rank == 0 and all(p <= 0.5 for p in t.accept_probs)
        elif t.num_candidates > 1:
            assert t.accept_prob > 0.5 and t.candidates[-1] == t.token_id
            assert all(p <= 0.5 for p in t.accept_probs[:-1])
    assert any(t.rejected for t in traces)


class _BrokenAgent:
    """Behaves like an agent until asked to judge, then raises."""

    def __init__(self, agent):
        self.card, self.hidden_size, self.name = agent.card, agent.hidden_size, "broken"

    def accept_probs(self, states):
        raise RuntimeError("agent exploded")


def test_a_failing_request_fails_alone_and_the_others_finish(tiny_lm, agents):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4))
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    reqs = [Request("ok1", [0, 5], params, agents["half"]),
            Request("bad", [0, 6], params, _BrokenAgent(agents["half"])),
            Request("ok2", [0, 7], params, None)]  # fmt: skip
    got = run_all_requests(engine, reqs)
    assert got["bad"][1][0].finish_reason == "error" and "exploded" in got["bad"][1][0].error
    for rid in ("ok1", "ok2"):
        req = reqs[0 if rid == "ok1" else 2]
        want, _ = reference_generate(tiny_lm.model, req.prompt_token_ids, req.agent, params, (1,))
        assert got[rid][0] == want and got[rid][1][0].finish_reason in ("stop", "length")
    assert engine.num_running == 0


def run_all_requests(engine, reqs):
    for r in reqs:
        engine.add_request(r)
    return run_all(engine)


def test_async_engine_streams_and_cancel_aborts(tiny_lm, agents):
    async def main():
        engine = AsyncEngine(LLMEngine(tiny_lm, EngineConfig(max_running=2)))
        engine.start()
        params = SamplingParams(max_new_tokens=10)
        done = await engine.generate_all(Request("a", [0, 5], params, agents["half"]))
        want, _ = reference_generate(tiny_lm.model, [0, 5], agents["half"], params, (1,))
        assert done.new_token_ids == want
        long = SamplingParams(max_new_tokens=200, ignore_eos=True)
        stream = engine.generate(Request("b", [0, 6], long))
        async for _ in stream:
            break
        await stream.aclose()  # the consumer goes away (a client disconnect)
        for _ in range(100):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["running"] == 0
        engine.shutdown(timeout=1)
        assert not engine.is_alive()

    with torch.inference_mode():
        asyncio.run(main())


def test_launch_builds_the_engine_on_its_thread_and_run_uses_that_thread(tiny_lm, agents):
    """The engine thread is the process's only torch thread: `launch` builds the engine on it
    (the server loads the model there), `run` runs other torch work on it between steps and
    returns or raises what the work did; once stopped, `run` refuses."""
    built_on = []

    def build():
        built_on.append(threading.get_ident())
        return LLMEngine(tiny_lm, EngineConfig(max_running=2))

    engine = AsyncEngine.launch(build)
    stepped_on = []
    real_step = engine.engine.step

    def step():
        stepped_on.append(threading.get_ident())
        return real_step()

    engine.engine.step = step

    async def main():
        params = SamplingParams(max_new_tokens=4)
        done = await engine.generate_all(Request("a", [0, 5], params, agents["half"]))
        assert len(done.new_token_ids) == 4

    with torch.inference_mode():
        asyncio.run(main())
    assert built_on[0] != threading.get_ident() and set(stepped_on) == set(built_on)
    assert engine.run(threading.get_ident) == built_on[0]
    with pytest.raises(ZeroDivisionError):
        engine.run(lambda: 1 / 0)
    assert engine.is_alive()  # a failing call fails its caller, not the engine
    engine.shutdown(timeout=1)
    with pytest.raises(EngineNotReadyError):
        engine.run(threading.get_ident)


def test_launch_raises_what_the_build_raised():
    def build():
        raise ModelLoadError("no such model: nowhere")

    with pytest.raises(ModelLoadError, match="nowhere"):
        AsyncEngine.launch(build)


def test_add_requests_admits_all_or_none_and_one_stream_collects_them(tiny_lm, agents):
    async def main():
        engine = AsyncEngine(LLMEngine(tiny_lm, EngineConfig(max_running=2, max_waiting=3)))
        engine.start()
        params = SamplingParams(max_new_tokens=6, temperature=0.0)
        reqs = [Request(f"r{i}", [0, 5 + i], params, agents["half"]) for i in range(4)]
        with pytest.raises(QueueFullError):  # 4 > 3 waiting places: refused at once, whole
            engine.add_requests(reqs)
        assert engine.engine.num_waiting == 0 and engine.engine.num_running == 0
        bad = Request("bad", [0, 10**6], params)
        with pytest.raises(InvalidRequestError):  # one invalid request refuses them all
            engine.add_requests([reqs[0], bad])
        assert engine.engine.num_waiting == 0
        stream = engine.add_requests(reqs[:3])  # admitted synchronously: no await needed
        got: dict[str, list[int]] = {r.request_id: [] for r in reqs[:3]}
        async for out in stream:  # one collector for all three
            got[out.request_id] += out.new_token_ids
        assert stream.finished
        for r in reqs[:3]:
            want, _ = reference_generate(tiny_lm.model, r.prompt_token_ids, r.agent, params, (1,))
            assert got[r.request_id] == want
        engine.shutdown(timeout=1)

    with torch.inference_mode():
        asyncio.run(main())


def test_runners_share_the_weights_laid_out_once_at_load_time(tiny_lm):
    """A second engine on the same loaded model fuses nothing again: both runners read the
    same storage (a runner's split matmuls are views), and so do the HF modules (the reference
    decoder)."""
    first, second = ModelRunner(tiny_lm, 2), ModelRunner(tiny_lm, 2)
    params = {name: p.data_ptr() for name, p in tiny_lm.model.named_parameters()}
    third = ModelRunner(tiny_lm, 2)
    assert {n: p.data_ptr() for n, p in tiny_lm.model.named_parameters()} == params
    for a, b, c in zip(first.layers, second.layers, third.layers, strict=True):
        for name in ("qkv_w", "o_w", "gate_up_w", "down_w"):
            ptrs = {getattr(runner, name).data_ptr() for runner in (a, b, c)}
            assert len(ptrs) == 1, name
    attn = tiny_lm.model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == first.layers[0].qkv_w.data_ptr()
    ids = [0, 5, 9, 3]
    hidden = first.prefill(0, ids)
    torch.testing.assert_close(hidden, last_hidden(tiny_lm, ids), atol=1e-5, rtol=1e-5)


def test_split_matmuls_give_the_reference_tokens(agents):
    """The CPU float32 default runs each projection and the LM head as a batched matmul over
    slices of the output rows (weights.split_for_cpu): views of the HF weights (no copy), and
    the engine still emits the reference's tokens (the reference runs the HF forward on the
    same model)."""
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=4))
    runner = engine.runner
    assert runner.split_matmuls
    layer = runner.layers[0]
    for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w, runner.head_w):
        assert w.dim() == 3 and w.shape[0] > 1  # the split path runs, not F.linear
    attn = lm.model.model.layers[0].self_attn
    assert layer.qkv_w.data_ptr() == attn.q_proj.weight.data_ptr()  # a view, not a copy
    assert not LLMEngine(lm, EngineConfig(split_matmuls=False)).runner.layers[0].qkv_w.dim() == 3
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    reqs = [Request(str(i), [0, 5 + i, 9], params, agents[m])
            for i, m in enumerate(("half", "reject", "accept"))]  # fmt: skip
    reqs.append(Request("plain", [0, 3, 4], params))
    results = engine.generate(reqs)
    for r in reqs:
        want, _ = reference_generate(lm.model, r.prompt_token_ids, r.agent, params, (1,))
        assert results[r.request_id][0] == want, r.request_id


def test_split_linear_equals_f_linear():
    """`_linear` over a split view computes x @ w.T + b for every row count and group count."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    for threads in (1, 2, 6):
        w3, b3 = split_weight(w, b, threads)
        assert w3.dim() == 3 and w3.data_ptr() == w.data_ptr()
        for n in (1, 3, 17):
            x = torch.randn(n, 40)
            torch.testing.assert_close(_linear(x, w3, b3), F.linear(x, w, b))
            torch.testing.assert_close(_linear(x, w3, None), F.linear(x, w))


def test_the_lm_head_is_split_in_vocabulary_slices_and_still_equals_f_linear():
    """The LM head runs in slices of at most 512 vocabulary rows (weights.head_groups); a
    vocabulary with no such divisor keeps the layers' split."""
    assert [head_groups(v, 2) for v in (49152, 128256, 32000, 256, 50257)] == [96, 256, 64, 4, 1]
    torch.manual_seed(0)
    w = torch.randn(49152, 8)
    w3, _ = split_weight(w, None, 2, head_groups(49152, 2))
    assert w3.shape == (96, 8, 512) and w3.data_ptr() == w.data_ptr()
    for n in (1, 4, 16):
        x = torch.randn(n, 8)
        torch.testing.assert_close(_linear(x, w3, None), F.linear(x, w))


def test_a_prompt_only_request_needs_no_free_slot(tiny_lm):
    """max_new_tokens 0 (completions' echo scoring): answered at the next step even while
    every slot is taken, without a prefill."""
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=1))
    engine.add_request(Request("long", [0, 1, 2], SamplingParams(max_new_tokens=20)))
    engine.step()
    prefills, prefill = [], engine.runner.prefill
    engine.runner.prefill = lambda *a, **k: prefills.append(1) or prefill(*a, **k)
    engine.add_request(Request("score", [3, 4, 5], SamplingParams(max_new_tokens=0)))
    (out,) = [o for o in engine.step() if o.request_id == "score"]
    assert out.finished and out.finish_reason == "length" and out.new_token_ids == []
    assert out.num_prompt_tokens == 3 and prefills == [] and engine.num_running == 1

"""The KV cache is allocated once from a byte budget: slots and context are fitted at start
(kv_cache.KVPlan), admission is a free slot, nothing grows during a step."""

from __future__ import annotations

import mmap

import pytest
import torch
from tiny_models import tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.errors import ContextLengthExceededError
from mara_serve.engine.kv_cache import KVPlan
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import MAX_CANDIDATES
from mara_serve.engine.sampling import SamplingParams

# tiny_llama: 2 layers x 2 kv heads x 16 dims x 2 (K and V) x 4 bytes = 512 bytes per token;
# one slot = (256 context + 256 scratch) positions = 256 KiB.
PER_TOKEN, SLOT = 512, 512 * (256 + MAX_CANDIDATES)


def test_plan_fits_slots_then_caps_the_context():
    assert KVPlan.fit(None, 10, 100, 16, 8) == KVPlan(16, 100, 8, 16 * 108 * 10)
    plan = KVPlan.fit(3 * 108 * 10 + 5, 10, 100, 16, 8)
    assert (plan.slots, plan.max_len) == (3, 100) and "at most 3 request(s)" in plan.notes[0]
    assert KVPlan.fit(16 * 1080, 10, 100, 16, 8).notes == ()  # all 16 fit: nothing to say
    plan = KVPlan.fit(600, 10, 100, 16, 8)  # not one full-length sequence: the context shrinks
    assert (plan.slots, plan.max_len) == (1, 52) and "capped to 52" in plan.notes[0]
    plan = KVPlan.fit(3 * 1080 + 100, 10, 100, 16, 8, reserved=1080)  # the prefix cache's part
    assert plan.slots == 2
    with pytest.raises(ValueError, match="too small"):
        KVPlan.fit(200, 10, 100, 16, 8)


def test_a_budget_caps_concurrency_and_admission_waits_for_a_slot(agents):
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=8, kv_cache_memory=2 * SLOT + 1000))
    assert engine.max_running == 2 and engine.runner.cache.num_slots == 2
    assert engine.stats()["kv_cache_slots"] == 2
    assert engine.stats()["kv_cache_bytes"] == 2 * SLOT
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    reqs = [Request(f"r{i}", [0, 5 + i, 9], params, agents["half"]) for i in range(5)]
    for r in reqs:
        engine.add_request(r)
    seen_running = []
    results = {r.request_id: [] for r in reqs}
    while engine.has_work():
        for out in engine.step():
            results[out.request_id] += out.new_token_ids
        seen_running.append(engine.num_running)
    assert max(seen_running) == 2  # never more sequences than the budget's slots
    for r in reqs:
        want, _ = reference_generate(lm.model, r.prompt_token_ids, r.agent, params, (1,))
        assert results[r.request_id] == want


def test_a_budget_below_one_sequence_caps_max_model_len_and_the_cache_never_moves(agents):
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=4, kv_cache_memory=(100 + 256) * PER_TOKEN))
    assert engine.max_running == 1 and engine.max_model_len == 100
    keys, values = engine.runner.cache.keys.data_ptr(), engine.runner.cache.values.data_ptr()
    params = SamplingParams(max_new_tokens=90, temperature=0.0, ignore_eos=True)
    with pytest.raises(ContextLengthExceededError, match="100 tokens"):
        engine.add_request(Request("long", list(range(2, 20)), params))
    prompt = list(range(2, 12))  # 10 + 90 = the whole capped context, candidates past it
    engine.add_request(Request("full", prompt, params, agents["half"]))
    ids, _, reason = _run(engine)["full"]
    assert len(ids) == 90 and reason == "length"
    want, _ = reference_generate(lm.model, prompt, agents["half"], params, (1,))
    assert ids == want
    cache = engine.runner.cache
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == (keys, values)  # no growth


def _run(engine):
    results = {}
    while engine.has_work():
        for out in engine.step():
            ids, traces, _ = results.get(out.request_id, ([], [], ""))
            results[out.request_id] = (ids + out.new_token_ids, traces + out.traces,
                                       out.finish_reason or "")  # fmt: skip
    return results


def test_the_cpu_cache_is_zero_pages_committed_as_written():
    engine = LLMEngine(tiny_llama(), EngineConfig(max_running=2))
    cache = engine.runner.cache
    assert isinstance(cache._keys_map, mmap.mmap) and isinstance(cache._values_map, mmap.mmap)
    assert not torch.any(cache.keys) and not torch.any(cache.values)
    assert cache.capacity == 256 + MAX_CANDIDATES and cache.nbytes == 2 * SLOT

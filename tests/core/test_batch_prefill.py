"""Batched prefill: prompts admitted together share one forward and get the state a prefill of
each alone gives; the engine with it still emits the serial reference's tokens; a prompt that
fails is isolated (mara_serve/engine/runner.py `prefill_batch`, engine.py `_prefill`)."""

import pytest
import torch
from tiny_models import random_prompts

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.prefix_cache import PrefixCache
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import ModelRunner
from mara_serve.engine.sampling import SamplingParams

SYSTEM = random_prompts(1, seed=21, length=19)[0]


def test_packed_prefill_equals_one_prefill_per_prompt(tiny_lm):
    runner = ModelRunner(tiny_lm, max_slots=8)
    cache = PrefixCache(max_tokens=256, block_size=8)
    cached = SYSTEM + [4, 5]
    runner.prefill(0, cached)
    cache.store(runner.cache, 0, cached)
    prompts = [SYSTEM + [9, 10, 11], [3, 4, 5, 6, 7], [8], SYSTEM[:10] + [12, 13]]
    items = []
    for slot, p in enumerate(prompts, start=1):
        start = cache.load(runner.cache, slot, cache.match(p))
        items.append((slot, p, start))
    assert [start for *_, start in items] == [16, 0, 0, 8]  # from cached blocks and from scratch
    hidden = runner.prefill_batch(items)  # float32 rounding differs with the row count
    for i, p in enumerate(prompts):
        alone = runner.prefill(5 + (i % 3), p)  # a fresh full prefill in a spare slot
        torch.testing.assert_close(hidden[i], alone, atol=1e-4, rtol=1e-4)
        with torch.inference_mode():
            hf = tiny_lm.model.model(torch.tensor([p])).last_hidden_state[0, -1]
        torch.testing.assert_close(hidden[i], hf, atol=1e-4, rtol=1e-4)
        n = len(p)
        for kv in (runner.cache.keys, runner.cache.values):
            torch.testing.assert_close(kv[:, i + 1, :, :n], kv[:, 5 + (i % 3), :, :n],
                                       atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("prefix_cache_tokens", [0, 512])
def test_engine_with_batched_prefill_equals_reference(
    tiny_lm, agents, prefix_cache_tokens, monkeypatch
):
    """Eight requests (mixed agents, shared and distinct prefixes, an identical pair) arriving in
    two bursts: every answer is the serial reference's, and the prompts really were prefilled
    packed (the engine's one-by-one fallback would give the same tokens, so it must not run)."""
    config = EngineConfig(max_running=8, batch_prefill=True,
                          prefix_cache_tokens=prefix_cache_tokens)  # fmt: skip
    engine = LLMEngine(tiny_lm, config)
    packed, one_by_one = [], []
    prefill_batch, prefill = engine.runner.prefill_batch, engine.runner.prefill

    def spy_batch(items):
        hidden = prefill_batch(items)
        packed.append(len(items))
        return hidden

    def spy_prefill(slot, ids, start=0):
        one_by_one.append(slot)
        return prefill(slot, ids, start)

    monkeypatch.setattr(engine.runner, "prefill_batch", spy_batch)
    monkeypatch.setattr(engine.runner, "prefill", spy_prefill)
    tails = random_prompts(6, seed=8, length=4)
    prompts = [SYSTEM + t for t in tails[:4]] + tails[4:] + [SYSTEM + tails[0], [0, 17, 18]]
    modes = ["half", "accept", None, "reject", "half", None, "half", "accept"]
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    reqs = [Request(str(i), p, params, agents[m] if m else None)
            for i, (p, m) in enumerate(zip(prompts, modes, strict=True))]  # fmt: skip
    got = {r.request_id: [] for r in reqs}
    for burst in (reqs[:5], reqs[5:]):
        for r in burst:
            engine.add_request(r)
        while engine.has_work():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
    for r in reqs:
        want, _ = reference_generate(tiny_lm.model, r.prompt_token_ids, r.agent, r.params, (1,))
        assert got[r.request_id] == want, f"request {r.request_id}"
    assert packed and max(packed) > 1 and not one_by_one, (packed, one_by_one)


def test_a_failing_prompt_in_a_batch_fails_alone(tiny_lm, agents, monkeypatch):
    engine = LLMEngine(tiny_lm, EngineConfig(max_running=4, batch_prefill=True))
    bad = [0, 66, 67, 68]
    prefill, prefill_batch = engine.runner.prefill, engine.runner.prefill_batch

    def flaky_batch(items):  # the packed forward of several prompts fails
        if len(items) > 1:
            raise RuntimeError("batch kernel failed")
        return prefill_batch(items)

    def flaky_prefill(slot, ids, start=0):
        if ids == bad:
            raise RuntimeError("this prompt breaks the model")
        return prefill(slot, ids, start)

    monkeypatch.setattr(engine.runner, "prefill_batch", flaky_batch)
    monkeypatch.setattr(engine.runner, "prefill", flaky_prefill)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    prompts = [[0, 5, 6], bad, [0, 9, 10, 11], [0, 5, 6]]
    reqs = [Request(str(i), p, params, agents["half"]) for i, p in enumerate(prompts)]
    got = {r.request_id: [] for r in reqs}
    finish = {}
    for r in reqs:
        engine.add_request(r)
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.finished:
                finish[out.request_id] = (out.finish_reason, out.error)
    assert finish["1"] == ("error", "this prompt breaks the model")
    for i in ("0", "2", "3"):
        want, _ = reference_generate(tiny_lm.model, prompts[int(i)], agents["half"], params, (1,))
        assert got[i] == want and finish[i][0] in ("stop", "length")
    assert engine.num_running == 0

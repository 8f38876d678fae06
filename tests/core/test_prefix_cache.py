"""Prefix caching: a prefill that starts from cached blocks computes the same state as a full
prefill, the engine with the cache on still emits the serial reference's tokens, and the cache
keeps to its budget (mara_serve/engine/prefix_cache.py)."""

import pytest
import torch
from tiny_models import random_prompts

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.prefix_cache import PrefixCache
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import ModelRunner
from mara_serve.engine.sampling import SamplingParams

SYSTEM = random_prompts(1, seed=11, length=21)[0]  # a shared "chat template" prefix


def test_prefill_from_a_cached_prefix_equals_a_full_prefill(tiny_lm):
    runner = ModelRunner(tiny_lm, max_slots=3)
    cache = PrefixCache(max_tokens=256, block_size=8)
    first = SYSTEM + [5, 6, 7]
    second = SYSTEM + [9, 10, 11, 12, 13]
    runner.prefill(0, first)
    cache.store(runner.cache, 0, first)  # blocks [0, 8), [8, 16), [16, 24)
    blocks = cache.match(second)
    assert len(blocks) == 2  # the third block of `first` holds other tokens
    start = cache.load(runner.cache, 1, blocks)
    assert start == 16
    hidden = runner.prefill(1, second, start)
    want = runner.prefill(2, second)  # full prefill of the same prompt
    torch.testing.assert_close(hidden, want, atol=1e-5, rtol=1e-5)
    n = len(second)
    for kv in (runner.cache.keys, runner.cache.values):
        torch.testing.assert_close(kv[:, 1, :, :n], kv[:, 2, :, :n], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        hf = tiny_lm.model.model(torch.tensor([second])).last_hidden_state[0, -1]
    torch.testing.assert_close(hidden, hf, atol=1e-5, rtol=1e-5)


def test_match_leaves_the_last_token_to_compute(tiny_lm):
    runner = ModelRunner(tiny_lm, max_slots=1)
    cache = PrefixCache(max_tokens=256, block_size=8)
    prompt = SYSTEM[:16]
    runner.prefill(0, prompt)
    cache.store(runner.cache, 0, prompt)
    assert len(cache.match(prompt)) == 1  # 2 full blocks cached, the last token recomputed
    assert len(cache.match(prompt + [3])) == 2
    assert cache.match([7] + prompt) == []  # same tokens at other positions: no match


def test_budget_evicts_least_recently_used_leaves_first(tiny_lm):
    runner = ModelRunner(tiny_lm, max_slots=1)
    cache = PrefixCache(max_tokens=32, block_size=8)  # four blocks
    shared = SYSTEM[:8]
    prompts = [shared + random_prompts(1, seed=s, length=9)[0] for s in range(4)]
    for p in prompts:
        runner.prefill(0, p)
        cache.store(runner.cache, 0, p)
        assert cache.num_tokens <= 32
    # the shared block was used by every prompt: it outlives the older leaves
    assert len(cache.match(shared + [1, 2])) == 1
    assert len(cache.match(prompts[-1])) == 2
    assert len(cache.match(prompts[0])) == 1  # its own leaf was evicted


def test_disabled_cache_holds_nothing(tiny_lm):
    runner = ModelRunner(tiny_lm, max_slots=1)
    cache = PrefixCache(max_tokens=0)
    runner.prefill(0, SYSTEM)
    cache.store(runner.cache, 0, SYSTEM)
    assert cache.num_tokens == 0 and cache.match(SYSTEM + [1]) == []


@pytest.mark.parametrize("mode", ["half", None])
def test_engine_with_prefix_cache_equals_reference(tiny_lm, agents, mode):
    """Requests sharing the prefix arrive one after another (cache hits from the second on),
    and again in one batch; every answer is the serial reference's."""
    config = EngineConfig(max_running=4, prefix_cache_tokens=512, prefix_block_size=8)
    engine = LLMEngine(tiny_lm, config)
    agent = agents[mode] if mode else None
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = [SYSTEM + tail for tail in random_prompts(6, seed=5, length=5)]
    turns = [[r] for r in range(3)] + [[3, 4, 5]]
    for turn in turns:
        reqs = [Request(f"{mode}-{i}", prompts[i], params, agent) for i in turn]
        got = engine.generate(reqs)
        for i, r in zip(turn, reqs, strict=True):
            want, _ = reference_generate(tiny_lm.model, prompts[i], agent, params, (1,))
            assert got[r.request_id][0] == want, f"prompt {i}"
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] >= 16 * 5  # two blocks for each later prompt
    assert stats["prefix_cache_tokens"] > 0

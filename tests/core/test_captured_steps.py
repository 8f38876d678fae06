"""Decode forwards padded to shape buckets (graphs.py) emit exactly the unpadded tokens: on a
CPU the padding runs eagerly (so its logic is tested in CI), on a GPU as CUDA graphs."""

import pytest
import torch
from parity_policy import check_against_reference
from tiny_models import PARITY_PROMPTS as PROMPTS
from tiny_models import make_agent, tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.graphs import CANDIDATE_BUCKETS, bucket, key_bucket
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu,
           pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)  # fmt: skip


def test_buckets_cover_and_cap():
    assert [bucket(n, CANDIDATE_BUCKETS, 256) for n in (1, 5, 40, 41, 300)] == [1, 6, 40, 48, 256]
    assert bucket(7, (1, 2, 4, 8), 6) == 6  # never past the cap (the cache's slots)
    assert [key_bucket(n, 10_000) for n in (1, 256, 257, 385, 513, 1025)] == [
        256, 256, 384, 512, 768, 1536,
    ]  # fmt: skip
    assert key_bucket(5000, 4100) == 4100


def requests(lm_fp32):
    """Mixed rows: plain, an agent that rejects about half, one that rejects everything;
    different lengths, so slots free up and later rounds run on non-dense slot sets."""
    agents = [None, make_agent("half", lm=lm_fp32), make_agent("reject", lm=lm_fp32)]
    return [
        Request(str(i), p, SamplingParams(max_new_tokens=6 + 3 * (i % 4), temperature=0.0),
                agents[i % 3])
        for i, p in enumerate(PROMPTS)
    ]  # fmt: skip


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_padded_steps_on_a_cpu_equal_the_reference(chunk_size):
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=5, chunk_size=chunk_size,
                                        captured_steps=True))  # fmt: skip
    reqs = requests(lm)
    results = engine.generate(reqs)
    for r in reqs:
        want = reference_generate(lm.model, r.prompt_token_ids, r.agent, r.params, (1,))[0]
        assert results[r.request_id][0] == want, r.request_id
    padded = engine.runner.padded
    assert padded is not None and padded.replays >= engine.num_steps // 2  # the path ran
    assert padded.captures == 0  # no graphs on a CPU


def test_padded_steps_are_off_by_default_on_a_cpu():
    assert LLMEngine(tiny_llama(), EngineConfig(max_running=2)).runner.padded is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graphs_follow_the_reference(device, dtype):
    """Graphs on: float32 tokens equal the eager engine's and the reference's exactly; bf16
    ones follow the reference up to near-ties (the documented policy, tests/parity_policy.py:
    padded shapes may pick other GEMM kernels, so bf16 rounding may differ from eager)."""
    lm = tiny_llama(dtype=dtype, device=device)
    fp32 = tiny_llama()
    outs = {}
    for captured in (True, False):
        reqs = requests(fp32)
        for r in reqs:
            if r.agent is not None:
                r.agent.to(device)
        engine = LLMEngine(lm, EngineConfig(max_running=5, captured_steps=captured))
        outs[captured] = {k: v[0] for k, v in engine.generate(reqs).items()}
        padded = engine.runner.padded
        if captured:
            assert padded.captures > 0 and padded.replays >= engine.num_steps // 2
        else:
            assert padded is None
    diverged = 0
    for r in reqs:
        want = reference_generate(lm.model, r.prompt_token_ids, r.agent, r.params, (1,))[0]
        got = outs[True][r.request_id]
        if dtype == torch.float32:
            assert got == want == outs[False][r.request_id], r.request_id
        else:
            diverged += check_against_reference(lm.model, dtype, r.prompt_token_ids, r.agent,
                                                 r.params, got, want) is not None  # fmt: skip
    assert diverged <= len(reqs) // 4

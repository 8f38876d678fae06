"""Parity in bfloat16 and float16 under the documented policy (tests/parity_policy.py,
docs/algorithm.md §8): the engine's tokens equal the serial reference's in the same dtype, or
leave them only at a near-tie of the reference's decision; divergences are counted."""

import pytest
import torch
from parity_policy import check_against_reference
from tiny_models import PARITY_PROMPTS as PROMPTS
from tiny_models import make_agent, tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.loading import cpu_has_fast_bf16, resolve_dtype
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu,
           pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [256, 4])
def test_half_precision_engine_follows_the_reference_up_to_near_ties(dtype, chunk_size, device):
    lm = tiny_llama(dtype=dtype, device=device)
    fp32 = tiny_llama()
    agents = [None, make_agent("half", lm=fp32), make_agent("reject", lm=fp32)]
    for agent in agents[1:]:
        agent.to(device)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    engine = LLMEngine(lm, EngineConfig(max_running=8, chunk_size=chunk_size))
    reqs = [Request(str(i), p, params, agents[i % 3]) for i, p in enumerate(PROMPTS)]
    results = engine.generate(reqs)
    diverged = 0
    for r in reqs:
        want, _ = reference_generate(lm.model, r.prompt_token_ids, r.agent, params, (1,))
        got = results[r.request_id][0]
        margins = check_against_reference(lm.model, dtype, r.prompt_token_ids, r.agent, params,
                                          got, want)  # fmt: skip
        if margins is not None:
            print(f"request {r.request_id} left the reference at a near-tie: {margins}")
            diverged += 1
    print(f"{dtype} chunk {chunk_size}: {diverged}/{len(reqs)} requests left the reference")
    assert diverged <= len(reqs) // 4  # a broken engine leaves it at once, nearly everywhere


def test_auto_dtype_is_bf16_only_on_a_cpu_with_native_bf16():
    with_bf16 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
    without = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    assert cpu_has_fast_bf16(with_bf16) and not cpu_has_fast_bf16(without)
    assert not cpu_has_fast_bf16("Features\t: fp asimd\n")  # no x86 flags line
    want = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_one_bf16_row_on_cpu_runs_as_a_gemv_and_follows_the_reference(monkeypatch):
    """One row in bf16 on a CPU goes through torch.mv/addmv (runner._linear: F.linear's one-row
    bf16 matmul reads weights at half the bandwidth); the tokens still follow the reference.
    (The eager runner's path: with native decoding on, one-token forwards run in C.)"""
    calls = {"mv": 0, "addmv": 0}
    for name in calls:
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    lm = tiny_llama(dtype=torch.bfloat16)
    fp32 = tiny_llama()
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    for agent in (None, make_agent("half", lm=fp32)):
        engine = LLMEngine(lm, EngineConfig(max_running=1, chunk_size=256, native_decode=False))
        req = Request("one", PROMPTS[0], params, agent)
        got = engine.generate([req])["one"][0]
        want, _ = reference_generate(lm.model, req.prompt_token_ids, agent, params, (1,))
        margins = check_against_reference(lm.model, torch.bfloat16, req.prompt_token_ids, agent,
                                          params, got, want)  # fmt: skip
        assert margins is None or got[: len(got) // 2] == want[: len(got) // 2], margins
    assert calls["mv"] > 0  # plain one-row forwards took the gemv path

    x, w = torch.randn(1, 64).bfloat16(), torch.randn(96, 64).bfloat16()
    b = torch.randn(96).bfloat16()
    from mara_serve.engine.runner import _linear

    before = calls["addmv"]
    torch.testing.assert_close(_linear(x, w, b), torch.nn.functional.linear(x, w, b),
                               rtol=2e-2, atol=2e-2)  # fmt: skip
    assert calls["addmv"] == before + 1  # a bias goes through addmv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runner_prefill_states_equal_the_hf_model_in_half_precision(dtype):
    """The runner's RMSNorm rounds like the HF module (float32, round, then scale by the
    weight): its prefill states equal HF's forward bit for bit (F.rms_norm's order made them
    differ, and greedy tokens flipped at ties the reference did not have)."""
    from mara_serve.engine.runner import ModelRunner

    lm = tiny_llama(dtype=dtype, init=0.1)
    with torch.no_grad():  # norm weights of a trained model, not HF's initial ones
        for name, p in lm.model.named_parameters():
            if "norm" in name:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    runner = ModelRunner(lm, max_slots=2)
    for ids in PROMPTS[:4]:
        with torch.inference_mode():
            want = lm.model.model(torch.tensor([ids])).last_hidden_state[0, -1]
            got = runner.prefill(0, ids)
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()

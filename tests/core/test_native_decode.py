"""The native one-token decode (mara_serve/engine/native): the C forward equals the eager
runner's (float32 to rounding, bfloat16 to a few bf16 ulps), writes the same K/V, and the engine
that uses it emits the serial reference's tokens (float32 exactly, bfloat16 under the parity
policy) — with the native path asserted to have run."""

import pytest
import torch
from parity_policy import check_against_reference
from tiny_models import PARITY_PROMPTS as PROMPTS
from tiny_models import make_agent, tiny_llama

from mara_serve.engine import native
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import ModelRunner
from mara_serve.engine.sampling import SamplingParams

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=0.02)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [0, 3])
def test_native_forward_equals_the_eager_runner(dtype, rank):
    """Same prompt in two slots; the next token (as a candidate of `rank`: its K/V go to
    length + rank, it sees the prefix and itself only) eager in slot 0, native in slot 1."""
    lm = tiny_llama(dtype=dtype)
    runner = ModelRunner(lm, max_slots=2, native_decode=True)
    assert runner.native is not None, runner.native_off_reason
    prompt = PROMPTS[1]
    for slot in (0, 1):
        runner.prefill(slot, prompt)
    L = len(prompt)
    for step, token in enumerate([7, 19, 3]):
        n = L + step
        eager = runner.forward_tokens(1, torch.tensor([n]), torch.tensor([token]),
                                      torch.tensor([0]), torch.tensor([0]), 1,
                                      torch.tensor([rank]))  # fmt: skip
        calls = runner.native.calls
        mine = runner.score([1], [n], [token], [0], [0], [rank])
        assert runner.native.calls == calls + 1  # the score went through C
        torch.testing.assert_close(mine.float(), eager.float(), **TOL[dtype])
        for cache in (runner.cache.keys, runner.cache.values):
            torch.testing.assert_close(cache[:, 1, :, n + rank].float(),
                                       cache[:, 0, :, n + rank].float(), **TOL[dtype])  # fmt: skip
        torch.testing.assert_close(runner.logits(mine), runner.lm.weights.lm_head(mine).float(),
                                   **TOL[dtype])  # fmt: skip
        if rank:  # commit the candidate as the engine does: its K/V move to position n
            runner.commit([0, 1], [n, n], [rank, rank])


@pytest.mark.parametrize("mode", [None, "half", "reject"])
def test_engine_with_native_decode_equals_the_reference_in_float32(tiny_lm, agents, mode):
    lm = tiny_lm
    engine = LLMEngine(lm, EngineConfig(max_running=1, chunk_size=256))
    assert engine.runner.native is not None, engine.runner.native_off_reason
    # plain rows greedy (a sampled plain row draws from the request's own generator)
    params = SamplingParams(max_new_tokens=24, temperature=0.0 if mode is None else 1.0)
    agent = agents[mode] if mode else None
    for i, prompt in enumerate(PROMPTS[:3]):
        got = engine.generate([Request(str(i), prompt, params, agent)])[str(i)][0]
        want, _ = reference_generate(lm.model, prompt, agent, params, lm.eos_token_ids)
        assert got == want
    assert engine.runner.native.calls > 0
    assert engine.stats()["native_decode"] == 1
    assert engine.stats()["native_decode_forwards"] == engine.runner.native.calls


def test_engine_with_native_decode_follows_the_bf16_reference():
    lm = tiny_llama(dtype=torch.bfloat16)
    fp32 = tiny_llama()
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    engine = LLMEngine(lm, EngineConfig(max_running=1, chunk_size=256))
    diverged = 0
    for i, prompt in enumerate(PROMPTS):
        agent = (None, make_agent("half", lm=fp32))[i % 2]
        got = engine.generate([Request(str(i), prompt, params, agent)])[str(i)][0]
        want, _ = reference_generate(lm.model, prompt, agent, params, (1,))
        margins = check_against_reference(lm.model, torch.bfloat16, prompt, agent, params, got,
                                          want)  # fmt: skip
        diverged += margins is not None
    assert engine.runner.native.calls > 0
    print(f"{diverged}/{len(PROMPTS)} requests left the bf16 reference at a near-tie")
    assert diverged <= len(PROMPTS) // 4


def test_unsupported_models_and_a_missing_compiler_stay_eager(monkeypatch):
    half = ModelRunner(tiny_llama(dtype=torch.float16), max_slots=1, native_decode=True)
    assert half.native is None and "float16" in half.native_off_reason
    int8 = ModelRunner(tiny_llama(dtype=torch.bfloat16, quantization="int8"), max_slots=1,
                       native_decode=True)  # fmt: skip
    assert int8.native is None and "int8" in int8.native_off_reason
    off = ModelRunner(tiny_llama(), max_slots=1, native_decode=False)
    assert off.native is None and "off" in off.native_off_reason

    def no_compiler():
        raise native.NativeBuildError("no C compiler found")

    monkeypatch.setattr(native, "build", no_compiler)
    lm = tiny_llama()
    engine = LLMEngine(lm, EngineConfig(max_running=1))
    assert engine.runner.native is None
    assert "did not build: no C compiler" in engine.runner.native_off_reason
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    got = engine.generate([Request("a", PROMPTS[0], params, None)])["a"][0]
    assert got == reference_generate(lm.model, PROMPTS[0], None, params, lm.eos_token_ids)[0]
    assert engine.stats()["native_decode"] == 0


def test_a_failing_compiler_raises_its_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.compile_library(tmp_path / "x.so")
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_without_a_compiler_the_best_prebuilt_kernel_for_the_cpu_is_loaded(tmp_path, monkeypatch):
    """The container image's runtime has no compiler: `prebuild` (run at image build time)
    leaves portable builds, and `build` loads the best one the CPU runs."""
    made = native.prebuild(tmp_path)
    assert made and all(p.exists() for p in made)
    if "x86-64" in native.PORTABLE_BUILDS and (tmp_path / "decode_cpu-x86-64.so").exists():
        bf16_cpu = set(native.PORTABLE_BUILDS["x86-64-v4-bf16"][1])
        assert native.prebuilt_for(bf16_cpu, tmp_path).name == "decode_cpu-x86-64-v4-bf16.so"
        avx2_cpu = set(native.PORTABLE_BUILDS["x86-64-v3"][1])
        assert native.prebuilt_for(avx2_cpu, tmp_path).name == "decode_cpu-x86-64-v3.so"
        assert native.prebuilt_for(set(), tmp_path).name == "decode_cpu-x86-64.so"
    monkeypatch.setattr(native, "PREBUILT_DIR", tmp_path)
    monkeypatch.setenv("MARA_NATIVE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "_lib", None)
    lm = tiny_llama()
    runner = ModelRunner(lm, max_slots=1, native_decode=True)
    assert runner.native is not None, runner.native_off_reason
    assert runner.native.lib._name.startswith(str(tmp_path))  # the prebuilt one
    runner.prefill(0, PROMPTS[0])
    L = len(PROMPTS[0])
    mine = runner.score([0], [L], [5], [0], [0], [0])
    eager = runner.forward_tokens(1, torch.tensor([L]), torch.tensor([5]), torch.tensor([0]),
                                  torch.tensor([0]), 1)  # fmt: skip
    torch.testing.assert_close(mine, eager, **TOL[torch.float32])
    monkeypatch.setattr(native, "_lib", None)
    (tmp_path / "decode_cpu-x86-64.so").unlink(missing_ok=True)
    for p in tmp_path.glob("decode_cpu-*.so"):
        p.unlink()
    with pytest.raises(native.NativeBuildError, match="no prebuilt kernel"):
        native.build()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_batch_of_rows_and_candidates_equals_the_eager_tree_forward(dtype):
    """Two rows, 5 and 2 candidates (tree attention: each sees its row's prefix and itself):
    the native batch equals the eager forward, and each token's state is the same bits as when
    it runs alone (a batch never changes a token's numbers)."""
    lm = tiny_llama(dtype=dtype)
    runner = ModelRunner(lm, max_slots=2, native_decode=True)
    runner.native_max_tokens = 64  # the kernel, whatever this CPU's policy (AMX: 4 in bf16)
    prompts = [PROMPTS[0], PROMPTS[2]]
    for slot, p in enumerate(prompts):
        runner.prefill(slot, p)
    lengths = [len(p) for p in prompts]
    tokens, row_of, col_of = [3, 9, 27, 81, 5, 44, 45], [0, 0, 0, 0, 0, 1, 1], [0, 1, 2, 3, 4, 0, 1]
    calls = runner.native.calls
    mine = runner.score([0, 1], lengths, tokens, row_of, col_of, col_of)
    assert runner.native.calls == calls + 1
    eager = runner.forward_tokens(2, torch.tensor(lengths), torch.tensor(tokens),
                                  torch.tensor(row_of), torch.tensor(col_of), 5)  # fmt: skip
    torch.testing.assert_close(mine.float(), eager.float(), **TOL[dtype])
    for i in (0, 4, 6):
        r = row_of[i]
        alone = runner.score([r], [lengths[r]], [tokens[i]], [0], [0], [col_of[i]])
        assert torch.equal(alone[0], mine[i])
    torch.testing.assert_close(runner.logits(mine), runner.lm.weights.lm_head(mine).float(),
                               **TOL[dtype])  # fmt: skip


def test_forwards_past_the_native_limit_run_eagerly(monkeypatch):
    """More tokens than `native_max_tokens` go to the eager forward; on a CPU with AMX a bf16
    model's limit is small (oneDNN's AMX matmul is nearly flat in rows)."""
    from mara_serve.engine import runner as runner_module
    from mara_serve.engine.loading import cpu_has_amx

    assert cpu_has_amx("flags\t: fpu avx512f amx_bf16 amx_tile\n")
    assert not cpu_has_amx("flags\t: fpu avx512f avx512_bf16\n")
    monkeypatch.setattr(runner_module, "cpu_has_amx", lambda: True)
    amx = ModelRunner(tiny_llama(dtype=torch.bfloat16), max_slots=1, native_decode=True)
    assert amx.native_max_tokens == runner_module.NATIVE_MAX_TOKENS_AMX_BF16
    assert ModelRunner(tiny_llama(), max_slots=1).native_max_tokens == 64  # float32: no AMX rule
    monkeypatch.setattr(runner_module, "cpu_has_amx", lambda: False)
    runner = ModelRunner(tiny_llama(), max_slots=1, native_decode=True)
    runner.native_max_tokens = 2
    runner.prefill(0, PROMPTS[0])
    L, calls = len(PROMPTS[0]), runner.native.calls
    runner.score([0], [L], [3, 4, 5], [0, 0, 0], [0, 1, 2], [0, 1, 2])
    assert runner.native.calls == calls  # three tokens: eager
    runner.score([0], [L], [3, 4], [0, 0], [0, 1], [0, 1])
    assert runner.native.calls == calls + 1


def test_an_unwritable_cache_is_a_build_error_not_a_crash(tmp_path, monkeypatch):
    """A read-only cache directory (a container's read-only root) must not take the engine
    down: the build error names the directory, and the runner stays eager."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MARA_NATIVE_CACHE", str(blocker / "native"))
    monkeypatch.setattr(native, "_lib", None)
    with pytest.raises(native.NativeBuildError, match="cannot write the compiled kernel"):
        native.build()
    runner = ModelRunner(tiny_llama(), max_slots=1, native_decode=True)
    assert runner.native is None and "cannot write" in runner.native_off_reason

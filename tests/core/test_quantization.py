"""Int8 weight-only quantization (`--quantization int8`, engine/quantization.py): the engine
follows the serial reference of the same quantized model, the runner multiplies by the very
int8 tensors the HF modules hold (one copy), the quantized model stays close to the float
one, and widths the kernel cannot handle are refused at load time."""

import pytest
import torch
from parity_policy import check_against_reference
from tiny_models import PARITY_PROMPTS as PROMPTS
from tiny_models import make_agent, tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.errors import ModelLoadError
from mara_serve.engine.quantization import (
    PACK_KERNEL_MAX_ROWS,
    Int8Linear,
    Int8Weight,
    check_kernel,
    int8_linear,
    quantize_int8,
    quantize_rows,
)
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.runner import ModelRunner
from mara_serve.engine.sampling import SamplingParams


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_engine_follows_the_reference_of_the_quantized_model(dtype):
    # init 0.1 (not the parity tests' 0.5, whose activations explode): int8_linear's two
    # paths (few rows / many) round differently, and the engine batches rows the reference
    # decodes one at a time
    lm = tiny_llama(dtype=dtype, init=0.1, quantization="int8")
    agents = [None, make_agent("half", lm=tiny_llama(init=0.1)), make_agent("reject")]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    engine = LLMEngine(lm, EngineConfig(max_running=8, chunk_size=4))
    reqs = [Request(str(i), p, params, agents[i % 3]) for i, p in enumerate(PROMPTS)]
    results = engine.generate(reqs)
    diverged = 0
    for r in reqs:
        want, _ = reference_generate(lm.model, r.prompt_token_ids, r.agent, params, (1,))
        margins = check_against_reference(lm.model, dtype, r.prompt_token_ids, r.agent, params,
                                          results[r.request_id][0], want)  # fmt: skip
        diverged += margins is not None
    assert diverged <= len(reqs) // 4  # as for half precision: near-ties only


def test_int8_modules_and_the_runner_share_one_copy_of_the_weights():
    lm = tiny_llama(dtype=torch.bfloat16, quantization="int8")
    layer = lm.model.model.layers[0]
    for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj,
              lm.model.lm_head):  # fmt: skip
        assert isinstance(m, Int8Linear) and m.weight.dtype == torch.int8
    runner = ModelRunner(lm, max_slots=2)
    lw = runner.layers[0]
    assert isinstance(lw.qkv_w, Int8Weight) and isinstance(runner.head_w, Int8Weight)
    # q/k/v fused once: the modules' int8 buffers are views of the runner's tensor
    assert layer.self_attn.q_proj.weight.data_ptr() == lw.qkv_w.q.data_ptr()
    assert layer.mlp.up_proj.scales.data_ptr() > lw.gate_up_w.scales.data_ptr()
    assert lw.down_w.q.data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    assert not runner.split_matmuls  # float32's split views do not apply to int8 weights


def test_int8_model_stays_close_to_the_float_model():
    ids = torch.tensor([PROMPTS[2]])
    # init 0.1: random weights of a trained model's scale (the parity tests' 0.5 makes
    # activations explode, and any rounding with them)
    base = tiny_llama(init=0.1).model(ids).logits.float()
    quant = tiny_llama(init=0.1, quantization="int8").model(ids).logits.float()
    rel = (quant - base).norm() / base.norm()
    assert rel < 0.05, rel
    assert (quant.argmax(-1) == base.argmax(-1)).all()


def test_quantize_rows_round_trips_within_half_a_step():
    w = torch.randn(64, 96)
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()


def test_widths_the_int8_kernel_cannot_handle_are_refused():
    check_kernel((96, 64), torch.bfloat16, torch.device("cpu"))  # supported: no error
    with pytest.raises(ModelLoadError, match="multiples of 32"):
        check_kernel((96, 200), torch.bfloat16, torch.device("cpu"))


def test_int8_linear_uses_the_int8_kernel_for_few_rows_and_a_float_matmul_above(monkeypatch):
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm",
                        lambda *a: calls.append(a[0].shape[0]) or real(*a))  # fmt: skip
    w = torch.randn(96, 64)
    q, scales = quantize_rows(w)
    dequant = q.float() * scales[:, None]
    for rows in (1, PACK_KERNEL_MAX_ROWS, PACK_KERNEL_MAX_ROWS + 1, 64):
        x = torch.randn(rows, 64)
        got = int8_linear(x.bfloat16(), q, scales.bfloat16(), None).float()
        torch.testing.assert_close(got, x @ dequant.T, rtol=3e-2, atol=3e-2)
    assert calls == [1, PACK_KERNEL_MAX_ROWS]  # the kernel only up to PACK_KERNEL_MAX_ROWS


def test_int8_refuses_a_model_type_the_engine_does_not_run():
    """A clear load error, not an AttributeError from a layout it does not know."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128,
                                       n_positions=32, eos_token_id=1, bos_token_id=0))  # fmt: skip
    with pytest.raises(ModelLoadError, match="model type 'gpt2' is not one"):
        quantize_int8(model.eval())

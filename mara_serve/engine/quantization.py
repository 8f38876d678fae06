"""Int8 weight-only quantization for CPU serving (`--quantization int8`).

Every projection of the decoder layers and the LM head keeps its weight as int8 with one
float scale per output row (symmetric, absmax / 127), and multiplies with torch's int8
weight-pack kernel (`torch._weight_int8pack_mm`: int8 weights, activations in the model dtype,
accumulation in float32). A one-row decode step is bound by the bytes of weights it reads:
int8 reads half the bytes of bf16 and a quarter of float32 (bench/RESULTS.md has the speed).
Embeddings, norms, attention and the KV cache stay in the model dtype; the agent reads the
same final hidden states as before, computed with the quantized weights.

The HF modules are replaced by `Int8Linear` in place, so everything that runs the model —
the batched runner (weights.py lays out the same int8 tensors, fused), the serial reference
decoder, training's perplexity — multiplies by the same int8 weights: parity between the
engine and the reference holds within the quantized model exactly as it does unquantized.

The kernel is a private torch op. It silently returns wrong numbers (or crashes) for input
widths it does not support, so `quantize_int8` checks every distinct weight shape against a
float matmul of the dequantized weight before it replaces anything, and refuses with a clear
error instead of serving wrong tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mara_serve.engine.errors import ModelLoadError

QUANTIZATIONS = ("none", "int8")
_IN_FEATURES_MULTIPLE = 32  # widths the kernel handles (others crash or return wrong numbers)
PACK_KERNEL_MAX_ROWS = 4  # int8_linear: the int8 kernel up to this many rows, a float matmul above


@dataclass(frozen=True)
class Int8Weight:
    """The runner's view of an int8 weight (weights.py; `runner._linear` multiplies by it)."""

    q: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) in the activations' dtype


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * scales[:, None]).T + bias, without materialising the product."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the activations' dtype
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear | nn.Module) -> Int8Linear:
        w = linear.weight.detach()
        q, scales = quantize_rows(w)
        bias = getattr(linear, "bias", None)
        return cls(q, scales.to(w.dtype), None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float → int8 (out, in) and float32 scales (out,): symmetric per output row."""
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """x (..., in) → (..., out) with an int8 (out, in) weight and per-row `scales`.

    The int8 kernel reads the weight once per input row (a gemv per row), so it wins only for
    a few rows; above PACK_KERNEL_MAX_ROWS (a batch of streams, a prefill) the weight is
    converted to the activations' dtype (exact: |q| <= 127) for one float matmul and the
    scales applied to its output. SmolLM2's 30 gate/up matrices with bf16 activations on a
    2-core AVX512-BF16 Xeon (`bench/matmuls.py`), ms: 1 row 3.4 (bf16 9.3), 4 rows 7.3
    (11.2), 8 rows 12.3 (10.1); the kernel at 256 rows 351 vs 56 converted (bf16 50)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= PACK_KERNEL_MAX_ROWS:
        y = torch._weight_int8pack_mm(x2.contiguous(), weight, scales)
    else:
        y = torch.nn.functional.linear(x2, weight.to(x.dtype)) * scales
    if bias is not None:
        y = y + bias
    return y.view(*lead, weight.shape[0])


def _projections(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer the decoder multiplies by, and the LM head;
    ModelLoadError for a model without the Llama-family layout the batched engine runs."""
    names = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
             ("mlp", ("gate_proj", "up_proj", "down_proj")))  # fmt: skip
    try:
        found = [(getattr(layer, part), n) for layer in model.model.layers
                 for part, linears in names for n in linears]  # fmt: skip
        found.append((model, "lm_head"))
        for parent, n in found:  # each projection exists (else AttributeError)
            getattr(parent, n)
    except AttributeError:
        model_type = getattr(model.config, "model_type", None)
        raise ModelLoadError(
            f"--quantization int8 needs a Llama-family model (q/k/v/o and gate/up/down "
            f"projections); model type {model_type!r} is not one"
        ) from None
    return found


def check_kernel(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
    """Raise ModelLoadError unless the int8 kernel multiplies an (out, in) = `shape` weight
    correctly in `dtype` on `device` (checked against a float matmul, at row counts that run
    the int8 kernel and the converted path)."""
    out_f, in_f = shape
    if in_f % _IN_FEATURES_MULTIPLE:
        raise ModelLoadError(
            f"--quantization int8 needs layer widths that are multiples of "
            f"{_IN_FEATURES_MULTIPLE}; this model has a {out_f}x{in_f} projection"
        )
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen).to(device)
    q, scales = quantize_rows(w)
    for rows in (1, PACK_KERNEL_MAX_ROWS, PACK_KERNEL_MAX_ROWS + 1):
        x = torch.randn(rows, in_f, generator=gen).to(device)
        want = x @ (q.float() * scales[:, None]).T
        got = int8_linear(x.to(dtype), q, scales.to(dtype), None).float()
        err = (got - want).abs().max() / want.abs().max().clamp(min=1e-6)
        if not torch.isfinite(got).all() or err > 0.05:
            raise ModelLoadError(
                f"--quantization int8: torch's int8 kernel gave wrong results for a "
                f"{out_f}x{in_f} weight in {dtype} on {device} (relative error {err:.3g}); "
                f"serve this model without quantization"
            )


@torch.no_grad()
def quantize_int8(model: nn.Module) -> int:
    """Replace the decoder's projections and the LM head by `Int8Linear` in place; returns how
    many. A head tied to the embedding gets its own int8 copy (the embedding stays in the
    model dtype): +1 byte per vocabulary entry and width, for a fifth fewer bytes per step on
    a small model."""
    device, dtype = model.device, model.dtype
    if device.type != "cpu":
        raise ModelLoadError(
            "--quantization int8 runs on a CPU; on a GPU serve bfloat16 or float16"
        )
    targets = _projections(model)
    for shape in sorted({tuple(getattr(p, n).weight.shape) for p, n in targets}):
        check_kernel(shape, dtype, device)
    for parent, name in targets:
        setattr(parent, name, Int8Linear.from_float(getattr(parent, name)))
    # the head no longer shares the embedding's tensor; keep transformers from re-tying it
    model.config.tie_word_embeddings = False
    return len(targets)

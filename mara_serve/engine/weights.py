"""`DecoderWeights`: the tensors the batched runner reads, laid out once per loaded model.

Built at load time (`LoadedModel.__post_init__`), never by a runner: every `ModelRunner` (the
server's engine, a second engine in `mara generate --compare`, training episodes) reads the
same `lm.weights`, so nothing is fused twice. q/k/v and gate/up are concatenated into one
weight each (one matmul instead of three or two; on a CPU per-op overhead was a large share of
a decode step). To keep ONE copy of those weights in memory, the HF modules' `weight.data`
become views of the fused tensors; the Parameter objects themselves are unchanged, so the HF
forward (the serial reference decoder, training's perplexity) reads the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that share an input; the modules then read slices of
    it (same storage, no second copy)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    sizes = [m.weight.shape[0] for m in linears]
    for m, part in zip(linears, weight.split(sizes), strict=True):
        m.weight.data = part
    if linears[0].bias is None:
        return weight, None
    bias = torch.cat([m.bias.detach() for m in linears])
    for m, part in zip(linears, bias.split(sizes), strict=True):
        m.bias.data = part
    return weight, bias


@dataclass(frozen=True)
class LayerWeights:
    ln1_w: torch.Tensor
    ln1_eps: float
    ln2_w: torch.Tensor
    ln2_eps: float
    qkv_w: torch.Tensor  # (Hq*d + 2*Hkv*d, H)
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    gate_up_w: torch.Tensor  # (2*I, H)
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    q_norm: nn.Module | None  # qwen3's per-head RMSNorms
    k_norm: nn.Module | None


@dataclass(frozen=True)
class DecoderWeights:
    layers: tuple[LayerWeights, ...]
    norm_w: torch.Tensor
    norm_eps: float
    embed: nn.Embedding
    lm_head: nn.Module

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: nn.Module) -> DecoderWeights:
        """The runner's view of a Llama-family `*ForCausalLM` (call once per model)."""
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up_w, gate_up_b = _fuse([mlp.gate_proj, mlp.up_proj])
            has_qk_norm = hasattr(attn, "q_norm")
            layers.append(
                LayerWeights(
                    ln1_w=layer.input_layernorm.weight,
                    ln1_eps=_eps(layer.input_layernorm),
                    ln2_w=layer.post_attention_layernorm.weight,
                    ln2_eps=_eps(layer.post_attention_layernorm),
                    qkv_w=qkv_w,
                    qkv_b=qkv_b,
                    o_w=attn.o_proj.weight,
                    o_b=attn.o_proj.bias,
                    gate_up_w=gate_up_w,
                    gate_up_b=gate_up_b,
                    down_w=mlp.down_proj.weight,
                    down_b=mlp.down_proj.bias,
                    act=mlp.act_fn,
                    q_norm=attn.q_norm if has_qk_norm else None,
                    k_norm=attn.k_norm if has_qk_norm else None,
                )  # fmt: skip
            )
        return cls(
            layers=tuple(layers),
            norm_w=model.model.norm.weight,
            norm_eps=_eps(model.model.norm),
            embed=model.model.embed_tokens,
            lm_head=model.get_output_embeddings(),
        )


def packed_for_cpu(layer: LayerWeights) -> LayerWeights:
    """The layer with every projection in oneDNN's blocked layout for the CPU (what inductor's
    CPU weight freezing uses). Measured on a 2-core AVX2 VM (bench/RESULTS.md): one-row matmuls
    ~1.5x faster than `F.linear`, 2-4 rows ~1.7x; whole engine, two A/Bs: +12-21 % with a MARA
    agent, plain decoding from a tie to +10 %, identical tokens. The packed tensors are opaque: the
    runner owns them (`LoadedModel.pack_for_serving`)."""

    def pack(w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)

    return replace(
        layer,
        qkv_w=pack(layer.qkv_w),
        o_w=pack(layer.o_w),
        gate_up_w=pack(layer.gate_up_w),
        down_w=pack(layer.down_w),
    )


def can_pack_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing applies to float32 weights on a CPU build with oneDNN (mkldnn)."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()

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

from mara_serve.engine.quantization import Int8Linear, Int8Weight

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _weight(linear: nn.Module) -> torch.Tensor | Int8Weight:
    """A linear layer's weight as the runner multiplies by it."""
    if isinstance(linear, Int8Linear):
        return Int8Weight(linear.weight, linear.scales)
    return linear.weight


def _fuse(linears: list[nn.Module]) -> tuple[torch.Tensor | Int8Weight, torch.Tensor | None]:
    """One weight (and bias) for linears that share an input; the modules then read slices of
    it (same storage, no second copy). Int8 layers (quantization.py) fuse their int8 weights
    and scales the same way."""
    sizes = [m.weight.shape[0] for m in linears]
    if all(isinstance(m, Int8Linear) for m in linears):
        q = torch.cat([m.weight for m in linears])
        scales = torch.cat([m.scales for m in linears])
        for m, q_part, s_part in zip(linears, q.split(sizes), scales.split(sizes), strict=True):
            m.weight, m.scales = q_part, s_part  # registered buffers: now views of the fused
        weight: torch.Tensor | Int8Weight = Int8Weight(q, scales)
    else:
        weight = torch.cat([m.weight.detach() for m in linears])
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
    # Projections: dense (out, in) float tensors, or Int8Weight under --quantization int8.
    qkv_w: torch.Tensor | Int8Weight  # (Hq*d + 2*Hkv*d, H)
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor | Int8Weight
    o_b: torch.Tensor | None
    gate_up_w: torch.Tensor | Int8Weight  # (2*I, H)
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor | Int8Weight
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
    head_w: torch.Tensor | Int8Weight  # the LM head's weight as the runner multiplies by it

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
                    o_w=_weight(attn.o_proj),
                    o_b=attn.o_proj.bias,
                    gate_up_w=gate_up_w,
                    gate_up_b=gate_up_b,
                    down_w=_weight(mlp.down_proj),
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
            head_w=_weight(model.get_output_embeddings()),
        )


def output_groups(out_features: int, threads: int) -> int:
    """How many groups `split_for_cpu` cuts a weight's output rows into: at least 4 and at
    least one per thread, dividing the rows evenly (1: leave the weight as it is)."""
    for groups in (max(4, threads), 4, 2):
        if out_features % groups == 0 and out_features // groups >= 16:
            return groups
    return 1


HEAD_SLICE_ROWS = 512  # the LM head's output rows per batched-matmul slice (`head_groups`)


def head_groups(vocab_size: int, threads: int) -> int:
    """Groups for the LM head: slices of at most HEAD_SLICE_ROWS vocabulary rows. The head is
    by far the widest matrix (49k-152k rows): in 4 slices, each slice's weight panel is tens of
    MB and MKL's few-row sgemm ran at a third of the bandwidth; in slices of 384-512 rows,
    measured on the 2-core AVX2 VM (SmolLM2, 49,152 × 576): 1 row 5.1 → 5.5 ms, 2 rows 12.8 →
    8.1, 4 rows 13.1 → 8.9, 16 rows 17.5 → 11.8, 64 rows 36.2 → 29.7 (bench/RESULTS.md). The
    layers' matrices (≤ 3k rows) gained nothing from more slices."""
    lowest = max(-(-vocab_size // HEAD_SLICE_ROWS), 4, threads)
    for groups in range(lowest, vocab_size // 128 + 1):  # slices of 128 rows at least
        if vocab_size % groups == 0:
            return groups
    return output_groups(vocab_size, threads)


def split_weight(w: torch.Tensor, b: torch.Tensor | None, threads: int, groups: int | None = None):
    """A dense (out, in) weight as a (groups, in, out/groups) VIEW (no copy) and its bias as
    (groups, 1, out/groups), for `runner._linear`'s batched matmul. `groups`: default
    `output_groups`."""
    groups = output_groups(w.shape[0], threads) if groups is None else groups
    if groups == 1:
        return w, b
    rows = w.shape[0] // groups
    w3 = w.view(groups, rows, w.shape[1]).transpose(1, 2)
    return w3, None if b is None else b.view(groups, 1, rows)


def split_for_cpu(layer: LayerWeights, threads: int) -> LayerWeights:
    """The layer with every projection viewed as `groups` batched matmuls over slices of its
    output rows. On a CPU in float32, MKL runs a one-row `F.linear` (a gemv) on ONE thread and
    reads weights at about half the memory bandwidth; a batched matmul over the slices runs the
    slices on every thread. Measured on a 2-core AVX2 VM, 30 matrices of each SmolLM2 shape
    (bench/RESULTS.md): gate/up at 1 row 21.5 → 10.2 ms (oneDNN-packed: 12.9), at 16 rows
    44.5 → 24.8 (32.0); whole engine +25-55 %, same tokens. The weights stay the HF modules'
    own storage (views), so the reference decoder and training read the same tensors."""
    qkv_w, qkv_b = split_weight(layer.qkv_w, layer.qkv_b, threads)
    o_w, o_b = split_weight(layer.o_w, layer.o_b, threads)
    gate_up_w, gate_up_b = split_weight(layer.gate_up_w, layer.gate_up_b, threads)
    down_w, down_b = split_weight(layer.down_w, layer.down_b, threads)
    return replace(layer, qkv_w=qkv_w, qkv_b=qkv_b, o_w=o_w, o_b=o_b, gate_up_w=gate_up_w,
                   gate_up_b=gate_up_b, down_w=down_w, down_b=down_b)  # fmt: skip


def can_split_for_cpu(device: torch.device, dtype: torch.dtype) -> bool:
    """The split matmul pays where MKL runs the matmul: float32 on a CPU."""
    return device.type == "cpu" and dtype == torch.float32

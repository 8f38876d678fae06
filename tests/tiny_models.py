"""Tiny random models and agents built in the test (no download), shared by all test tiers."""

from __future__ import annotations

import torch

from mara_serve.engine.agent import Agent, AgentCard, AgentNetwork
from mara_serve.engine.loading import LoadedModel

VOCAB = 128
# Prompts of varied lengths (a repeated pair, a long one) the parity tests decode on.
PARITY_PROMPTS = [[0, 5, 6, 7], [0, 9], [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [0, 40, 41],
                  [0, 17] * 9, [0, 99, 98, 97, 96], [0, 64], [0, 2, 3, 4, 5, 6, 100]]  # fmt: skip


def tiny_llama(
    seed: int = 0,
    init: float = 0.5,
    max_pos: int = 256,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quantization: str = "none",
) -> LoadedModel:
    """A 2-layer Llama with GQA and a peaked random output (varied candidate counts), in
    `dtype` on `device` (moved, and quantized with `quantization` = "int8", before the
    LoadedModel lays out the runner's weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
        initializer_range=init, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).float().eval().requires_grad_(False)
    model.to(device=device, dtype=dtype)
    if quantization == "int8":
        from mara_serve.engine.quantization import quantize_int8

        quantize_int8(model)
    return LoadedModel(
        model=model, tokenizer=None, name="tiny-llama", device=torch.device(device),
        dtype=dtype, hidden_size=64, vocab_size=VOCAB, max_model_len=max_pos,
        eos_token_ids=(1,), quantization=quantization,
    )  # fmt: skip


def make_agent(mode: str, hidden: int = 64, seed: int = 0, lm: LoadedModel | None = None) -> Agent:
    """'accept' accepts everything, 'reject' rejects everything, 'half' about half of `lm`'s
    candidate states (decisions kept sharp, far from the 0.5 threshold)."""
    torch.manual_seed(seed)
    net = AgentNetwork(hidden, 64)
    with torch.no_grad():
        if mode == "accept":
            net.output_linear.weight.zero_()
            net.output_linear.bias.copy_(torch.tensor([-10.0, 10.0]))
        elif mode == "reject":
            net.output_linear.weight.zero_()
            net.output_linear.bias.copy_(torch.tensor([10.0, -10.0]))
        else:
            lm = lm or tiny_llama()
            states = lm.model.model(torch.randint(0, VOCAB, (8, 32))).last_hidden_state
            net.output_linear.weight.mul_(200.0)
            net.output_linear.bias.zero_()
            logits = net(states.reshape(-1, hidden))
            net.output_linear.bias[1] = -(logits[:, 1] - logits[:, 0]).median()
    return Agent(net, AgentCard(name=f"{mode}-agent", hidden_size=hidden, inner_dim=64))


def random_prompts(n: int, seed: int = 0, length: int = 6) -> list[list[int]]:
    """`n` random prompts of `length` ids (never the special ids 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


@torch.inference_mode()
def last_hidden(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """The final hidden state of the last position of `ids` (one plain HF forward)."""
    return lm.model.model(torch.tensor([ids])).last_hidden_state[0, -1]

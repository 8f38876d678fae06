"""Per-request logit controls, applied to a row's next-token logits before anything chooses
from them (candidate selection in MARA mode, temperature/top-k/top-p sampling otherwise).

Order, each on the float32 logits of one row:
1. `logit_bias`: add each token's bias (OpenAI);
2. `repetition_penalty` (vLLM/HF): every token seen in the prompt or the output has a positive
   logit divided by the penalty and a negative one multiplied by it;
3. `frequency_penalty` and `presence_penalty` (OpenAI): subtract count × frequency and
   (count > 0) × presence, counting the generated tokens only;
4. `min_tokens` (vLLM): the end tokens (EOS, stop_token_ids) are -inf until that many tokens
   were generated;
5. `allowed_token_ids` (vLLM): every other token is -inf (the end tokens too, unless listed);
6. `bad_words` (vLLM, as token sequences): the last token of a sequence is -inf whenever the
   generated tokens end with the rest of it.
The output constraint (constraints.py) is applied after these. State is the row's own tokens,
read from its `Sequence` each step: nothing is shared between requests. The reported logprobs
stay the model's own (sampling.token_logprobs), before any of this.
"""

from __future__ import annotations

import torch

from mara_serve.engine.constraints import TokenConstraint, constrain_logits
from mara_serve.engine.sampling import SamplingParams


def processed_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    stop_ids: frozenset[int],
    constraint: TokenConstraint | None,
) -> torch.Tensor:
    """The logits a row's next token is chosen from: the request's controls, then its output
    constraint (both skipped when absent). The engine's step and the serial reference call
    this one function, so they process a row identically."""
    if params.controls_logits:
        logits = apply_logit_controls(logits, params, prompt_ids, output_ids, stop_ids)
    if constraint is not None:
        logits = constrain_logits(logits, constraint)
    return logits


def apply_logit_controls(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: list[int],
    output_ids: list[int],
    stop_ids: frozenset[int],
) -> torch.Tensor:
    """A float32 copy of one row's logits (V,) with the request's controls applied."""
    out = logits.float().clone()
    V = out.numel()
    if params.logit_bias:
        ids = torch.tensor([i for i, _ in params.logit_bias], device=out.device)
        bias = torch.tensor([b for _, b in params.logit_bias], device=out.device)
        out.index_add_(0, ids, bias)
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.zeros(V, dtype=torch.bool, device=out.device)
        seen[torch.tensor(prompt_ids + output_ids, device=out.device)] = True
        p = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, device=out.device), minlength=V)
        counts = counts[:V].to(out.dtype)
        out -= counts * params.frequency_penalty + (counts > 0).to(out.dtype) * (
            params.presence_penalty
        )
    if len(output_ids) < params.min_tokens and stop_ids:
        out[torch.tensor(sorted(stop_ids), device=out.device)] = float("-inf")
    if params.allowed_token_ids is not None:
        keep = torch.zeros(V, dtype=torch.bool, device=out.device)
        keep[torch.tensor(params.allowed_token_ids, device=out.device)] = True
        out = out.masked_fill(~keep, float("-inf"))
    banned = [seq[-1] for seq in params.bad_words_ids
              if len(seq) == 1 or tuple(output_ids[-(len(seq) - 1):]) == seq[:-1]]  # fmt: skip
    if banned:
        out[torch.tensor(banned, device=out.device)] = float("-inf")
    return out

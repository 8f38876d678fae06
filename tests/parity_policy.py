"""The half-precision parity policy (docs/algorithm.md §8), as a check the tests share.

In float32 the engine emits exactly the serial reference's tokens. In bfloat16/float16 the
engine and the reference (the model's own transformers forward, in the same dtype) sum the same
products in different orders, so their states differ in the last bits, and a decision that sits
on a knife's edge can flip. The policy: the engine's tokens equal the reference's up to the
first step where they differ, and at that step the reference's decision must be a *near-tie*:

- two candidates it ordered (up to one past the emitted rank; plain rows: the top two) are
  within `EPS_LOGPROB` nats of each other, or
- the agent's accept log-odds of a candidate it judged is within `EPS_LOGODDS` of 0 (p = 0.5),
  or
- the judged list reached the last candidate and the top-p cut is within `EPS_TOP_P` of a
  candidate's cumulative probability.

Anything else is a bug. Tests count the divergent requests and report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mara_serve.engine.agent import Agent
from mara_serve.engine.candidates import select_candidates
from mara_serve.engine.sampling import SamplingParams

# A bf16 number carries 8 significant bits (relative error 2^-9 ~ 0.2 %); through a few
# hundred additions of a logit or an agent layer that is ~0.05 nats on SmolLM2-sized models.
# The epsilons give that headroom; fp16 (11 bits) gets a quarter.
EPS_LOGPROB = {torch.bfloat16: 0.25, torch.float16: 0.06}
EPS_LOGODDS = {torch.bfloat16: 1.0, torch.float16: 0.25}
EPS_TOP_P = {torch.bfloat16: 0.02, torch.float16: 0.005}


@dataclass(frozen=True)
class Margins:
    logprob_gap: float  # smallest gap between consecutive ordered candidates that mattered
    accept_logodds: float  # smallest |log(p / (1 - p))| of a judged candidate
    top_p_gap: float  # distance of the top-p cut from a candidate boundary (if it mattered)

    def near_tie(self, dtype: torch.dtype) -> bool:
        return (
            self.logprob_gap < EPS_LOGPROB[dtype]
            or self.accept_logodds < EPS_LOGODDS[dtype]
            or self.top_p_gap < EPS_TOP_P[dtype]
        )


@torch.inference_mode()
def decision_margins(
    model, prefix: list[int], agent: Agent | None, params: SamplingParams
) -> Margins:
    """How close the reference's decision after `prefix` is to flipping."""
    device = next(model.parameters()).device

    def last_state(ids: list[int]) -> torch.Tensor:
        return model.model(torch.tensor([ids], device=device)).last_hidden_state[0, -1]

    logits = model.lm_head(last_state(prefix)).float()
    logp = torch.log_softmax(logits, dim=-1)
    if agent is None:
        top = torch.topk(logp, 2).values
        return Margins(float(top[0] - top[1]), math.inf, math.inf)
    cands = select_candidates(logits, params.mara_top_k(), params.mara_top_p())
    ids = cands.token_ids.tolist()
    if len(ids) == 1:  # emitted without asking the agent: only the top-p cut can flip it
        cum = float(cands.probs[0])
        return Margins(math.inf, math.inf, abs(cum - params.mara_top_p()))
    odds, chosen = [], len(ids) - 1
    for j, c in enumerate(ids):
        p = float(agent.accept_probs(last_state(prefix + [c])[None].float())[0])
        p = min(max(p, 1e-12), 1 - 1e-12)
        odds.append(abs(math.log(p / (1 - p))))
        if p > 0.5:
            chosen = j
            break
    lp = logp[cands.token_ids].tolist()
    upto = min(chosen + 1, len(ids) - 1)
    gaps = [lp[j] - lp[j + 1] for j in range(upto)]
    top_p_gap = math.inf
    if chosen == len(ids) - 1:  # every candidate was judged: the cut decided how many
        cum = torch.cumsum(cands.probs, 0).tolist()
        top_p_gap = min(abs(c - params.mara_top_p()) for c in cum[-2:])
    return Margins(min(gaps, default=math.inf), min(odds), top_p_gap)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_against_reference(
    model,
    dtype: torch.dtype,
    prompt: list[int],
    agent: Agent | None,
    params: SamplingParams,
    got: list[int],
    want: list[int],
) -> Margins | None:
    """None when the engine's tokens `got` equal the reference's `want`; else the margins at
    the first difference, asserting they are a near-tie under the policy."""
    i = first_difference(got, want)
    if i is None:
        return None
    margins = decision_margins(model, prompt + want[:i], agent, params)
    assert margins.near_tie(dtype), (
        f"the engine left the reference at token {i} where the decision was no tie: {margins}"
    )
    return margins

"""The serial reference decoder (docs/algorithm.md §8): §1–§3 one candidate at a time, through
the model's own transformers forward. It is the oracle of the parity tests and the baseline
of `bench/`.

For each step: candidates from the prefix's logits; for each candidate in order, run the model
on prefix + candidate (a DynamicCache cropped back to the prefix after every rejected candidate,
so each candidate sees exactly prefix + itself — §3's cache-sharing trap), ask the agent,
stop at the first accept. All rejected → re-run the top-1. One full forward per judged candidate,
as the authors' algorithm does; deliberately slow, deliberately simple.
"""

from __future__ import annotations

import torch

from mara_serve.engine.agent import Agent
from mara_serve.engine.candidates import select_candidates
from mara_serve.engine.constraints import TokenConstraint
from mara_serve.engine.logits_processing import processed_logits
from mara_serve.engine.request import TokenTrace
from mara_serve.engine.sampling import SamplingParams


@torch.inference_mode()
def reference_generate(
    model,
    prompt_ids: list[int],
    agent: Agent | None,
    params: SamplingParams = SamplingParams(),
    eos_token_ids: tuple[int, ...] = (),
    constraint: TokenConstraint | None = None,
) -> tuple[list[int], list[TokenTrace]]:
    """Greedy-accept MARA decoding (or greedy decoding without an agent) of one prompt;
    with a `constraint`, its disallowed tokens are masked before candidate selection."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))

    def forward(token_ids: list[int]) -> torch.Tensor:
        start = cache.get_seq_length()
        out = model.model(
            input_ids=torch.tensor([token_ids], device=device), past_key_values=cache,
            position_ids=torch.arange(start, start + len(token_ids), device=device)[None],
            use_cache=True,
        )  # fmt: skip
        return out.last_hidden_state[0, -1]  # final layer, after the final norm

    hidden = forward(prompt_ids)
    out_ids: list[int] = []
    traces: list[TokenTrace] = []
    while len(out_ids) < params.max_new_tokens:
        logits = model.lm_head(hidden).float()
        logits = processed_logits(logits, params, prompt_ids, out_ids, frozenset(stop),
                                  constraint)  # fmt: skip
        if agent is None:
            token = int(torch.argmax(logits))
            hidden = forward([token])
            trace = TokenTrace(token, 1, 0, None, False)
        else:
            cands = select_candidates(logits, params.mara_top_k(), params.mara_top_p(),
                                      params.min_p)  # fmt: skip
            ids = cands.token_ids.tolist()
            prefix_len = cache.get_seq_length()
            if len(ids) == 1:  # a single candidate is emitted without asking the agent
                hidden = forward(ids)
                trace = TokenTrace(ids[0], 1, 0, None, False)
            else:
                judged, probs, rank = [], [], None
                for j, c in enumerate(ids):
                    state = forward([c])
                    p = float(agent.accept_probs(state[None])[0])
                    judged.append(c)
                    probs.append(p)
                    if p > 0.5:
                        rank, hidden = j, state
                        break
                    cache.crop(prefix_len - cache.get_seq_length())  # drop the candidate
                if rank is None:  # all rejected: emit the top-1 (default_action_idx = 0)
                    hidden = forward([ids[0]])
                trace = TokenTrace(
                    ids[rank or 0], len(ids), rank or 0, None if rank is None else probs[-1],
                    rank is None, tuple(judged), tuple(probs),
                    tuple(cands.probs[: len(judged)].tolist()),
                )  # fmt: skip
        out_ids.append(trace.token_id)
        traces.append(trace)
        if constraint is not None:
            constraint.accept(trace.token_id)
        if trace.token_id in stop:
            break
    return out_ids, traces

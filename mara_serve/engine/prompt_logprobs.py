"""Log-probabilities of a prompt's own tokens under the base model (vLLM's `prompt_logprobs`).

Position t > 0 gets log p(ids[t] | ids[:t]) — float32 `log_softmax` over the whole vocabulary,
as the generated tokens' logprobs (sampling.token_logprobs) — its rank (1 = the most likely),
and the `k` most likely tokens there; position 0 has no context and gets None. One forward of
the prompt through the model; the LM head runs over `chunk` positions at a time so a long
prompt never holds a (T, V) float32 matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mara_serve.engine.loading import LoadedModel


class PromptTokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@torch.inference_mode()
def prompt_logprobs(
    lm: LoadedModel, ids: list[int], k: int, chunk: int = 256
) -> list[PromptTokenLogprob | None]:
    hidden = lm.model.model(torch.tensor([ids], device=lm.device)).last_hidden_state[0]
    head = lm.model.get_output_embeddings()
    out: list[PromptTokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)  # positions [start, end) predict ids[start + 1:]
        logp = torch.log_softmax(head(hidden[start:end]).float(), dim=-1)  # (n, V)
        target = torch.tensor(ids[start + 1 : end + 1], device=logp.device)
        chosen = logp.gather(1, target[:, None])[:, 0]  # (n,)
        ranks = (logp > chosen[:, None]).sum(-1) + 1
        if k:
            top_vals, top_ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v, strict=True))
                    for i, v in zip(top_ids.tolist(), top_vals.tolist(), strict=True)]  # fmt: skip
        else:
            tops = [()] * (end - start)
        for t, lp, r, top in zip(target.tolist(), chosen.tolist(), ranks.tolist(), tops,
                                 strict=True):  # fmt: skip
            out.append(PromptTokenLogprob(t, lp, r, top))
    return out

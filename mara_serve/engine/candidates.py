"""Candidate selection for one MARA step, exactly as docs/algorithm.md §1.

`logp = log_softmax(logits.float())`, keep the top-k (ties at the k-th value kept, as
transformers' `TopKLogitsWarper` does), renormalise, keep the smallest prefix whose cumulative
probability reaches top_p (transformers' `TopPLogitsWarper` arithmetic: ascending cumsum,
remove where cum <= 1 - top_p, the most probable token always kept). Candidates come out most
probable first; exact ties are ordered by token id so decoding is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Candidates:
    token_ids: torch.Tensor  # (n,) int64, most probable first
    probs: torch.Tensor  # (n,) float32, renormalised over the top-k set

    def __len__(self) -> int:
        return int(self.token_ids.numel())


def _order_ties_by_id(vals: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if vals.numel() > 1 and bool((vals[1:] == vals[:-1]).any()):
        by_id = torch.argsort(ids)
        vals, ids = vals[by_id], ids[by_id]
        by_val = torch.argsort(vals, descending=True, stable=True)
        vals, ids = vals[by_val], ids[by_val]
    return vals, ids


def _top_p_keep(vals: torch.Tensor, top_p: float, min_p: float = 0.0) -> tuple[int, torch.Tensor]:
    """vals: kept log-probs, descending. Returns (n kept, renormalised probs of all); with
    `min_p` (vLLM's), also only candidates at least min_p x the most probable one."""
    probs = torch.softmax(vals, dim=-1)
    cum_ascending = probs.flip(0).cumsum(0)
    remove = cum_ascending <= 1.0 - top_p
    remove[-1] = False  # the most probable token always stays
    n = int((~remove).sum())
    if min_p > 0.0:
        n = min(n, int((probs >= min_p * probs[0]).sum()))
    return n, probs


def select_candidates_batch(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float] | None = None
) -> list[Candidates]:
    """logits (B, V) → one ordered candidate list per row (CPU tensors).

    The device computes log_softmax and one top-(k+1) for the whole batch; the rest runs on
    the host from ONE device→host copy (a per-row loop of small device ops and syncs cost
    more than the whole forward of a small model on a GPU). The extra column tells whether
    the k-th value is tied past k; only then (rare) is the row's full distribution read."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    B, V = logp.shape
    width = min(max(top_k) + 1, V)
    top_vals, top_ids = torch.topk(logp, width, dim=-1, sorted=True)  # (B, width)
    vals_all, ids_all = top_vals.cpu(), top_ids.cpu()
    out = []
    for b in range(B):
        vals, ids = vals_all[b], ids_all[b]
        # never more candidates than tokens with a finite log-prob (a constrained row's logits
        # are -inf outside what its grammar allows, and -inf must not become a candidate)
        k = min(top_k[b], V, int(torch.isfinite(vals).sum()))
        if k < width and vals[k] == vals[k - 1]:  # ties at the k-th value are kept too
            row_ids = torch.nonzero(logp[b] >= logp[b, ids[k - 1]]).squeeze(-1)  # by id
            order = torch.argsort(logp[b, row_ids], descending=True, stable=True)
            row_ids = row_ids[order]
            row_vals, row_ids = logp[b, row_ids].cpu(), row_ids.cpu()
        else:
            row_vals, row_ids = _order_ties_by_id(vals[:k], ids[:k])
        n, probs = _top_p_keep(row_vals, top_p[b], min_p[b] if min_p else 0.0)
        out.append(Candidates(token_ids=row_ids[:n].clone(), probs=probs[:n].clone()))
    return out


def select_candidates(
    logits: torch.Tensor, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.0
) -> Candidates:
    """logits (V,) → the ordered candidate list of one row."""
    return select_candidates_batch(logits[None], [top_k], [top_p], [min_p])[0]

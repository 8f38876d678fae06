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


def _top_p_keep(vals: torch.Tensor, top_p: float) -> tuple[int, torch.Tensor]:
    """vals: kept log-probs, descending. Returns (n kept, renormalised probs of all)."""
    probs = torch.softmax(vals, dim=-1)
    cum_ascending = probs.flip(0).cumsum(0)
    remove = cum_ascending <= 1.0 - top_p
    remove[-1] = False  # the most probable token always stays
    n = int((~remove).sum())
    return n, probs


def select_candidates_batch(
    logits: torch.Tensor, top_k: list[int], top_p: list[float]
) -> list[Candidates]:
    """logits (B, V) → one ordered candidate list per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    B, V = logp.shape
    # never more candidates than tokens with a finite log-prob (a constrained row's logits are
    # -inf outside what its grammar allows, and -inf must not become a candidate)
    finite = torch.isfinite(logp).sum(-1).tolist()
    ks = [min(k, V, f) for k, f in zip(top_k, finite, strict=True)]
    kmax = max(ks)
    vals, ids = torch.topk(logp, kmax, dim=-1, sorted=True)  # (B, kmax)
    kth = vals[torch.arange(B), torch.tensor(ks) - 1]  # (B,)
    n_ge = (logp >= kth[:, None]).sum(-1).tolist()  # ties at the k-th value are kept too
    out = []
    for b in range(B):
        if n_ge[b] > ks[b]:
            row_ids = torch.nonzero(logp[b] >= kth[b]).squeeze(-1)  # ascending ids
            order = torch.argsort(logp[b, row_ids], descending=True, stable=True)
            row_ids = row_ids[order]
            row_vals = logp[b, row_ids]
        else:
            row_vals, row_ids = _order_ties_by_id(vals[b, : ks[b]], ids[b, : ks[b]])
        n, probs = _top_p_keep(row_vals, top_p[b])
        out.append(Candidates(token_ids=row_ids[:n].clone(), probs=probs[:n].clone()))
    return out


def select_candidates(logits: torch.Tensor, top_k: int = 40, top_p: float = 0.95) -> Candidates:
    """logits (V,) → the ordered candidate list of one row."""
    return select_candidates_batch(logits[None], [top_k], [top_p])[0]

"""Candidate selection (docs/algorithm.md §1) against transformers' own warpers, and edge cases."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from mara_serve.engine.candidates import select_candidates, select_candidates_batch


def hf_candidates(logits: torch.Tensor, k: int, p: float) -> list[int]:
    """What the authors' code keeps: TopK then TopP on float32 log-probs, most probable first."""
    logp = torch.log_softmax(logits.float(), -1)[None]
    scores = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, logp))[0]
    kept = torch.nonzero(torch.isfinite(scores)).squeeze(-1)
    order = torch.argsort(logp[0, kept], descending=True, stable=True)
    return kept[order].tolist()


@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0, 20.0])
def test_matches_transformers_warpers_on_random_logits(scale):
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * scale
    got = select_candidates_batch(logits, [40] * 64, [0.95] * 64)
    for row, cands in zip(logits, got, strict=True):
        assert cands.token_ids.tolist() == hf_candidates(row, 40, 0.95)


def test_per_row_top_k_and_top_p():
    torch.manual_seed(1)
    logits = torch.randn(4, 500) * 3
    ks, ps = [1, 5, 40, 100], [0.95, 0.5, 1.0, 0.9]
    got = select_candidates_batch(logits, ks, ps)
    for row, k, p, cands in zip(logits, ks, ps, got, strict=True):
        assert cands.token_ids.tolist() == hf_candidates(row, k, p)
    assert len(got[0]) == 1


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    c = select_candidates(probs.log(), top_k=40, top_p=0.8)
    # 0.5 < 0.8, 0.5 + 0.3 reaches 0.8 → the second token is kept, the third is not.
    assert c.token_ids.tolist() == [0, 1]
    c = select_candidates(probs.log(), top_k=40, top_p=0.81)
    assert c.token_ids.tolist() == [0, 1, 2]


def test_probabilities_are_renormalised_over_top_k():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    c = select_candidates(logits, top_k=2, top_p=1.0)
    expected = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    assert torch.allclose(c.probs, expected)
    assert c.token_ids.tolist() == [0, 1]


def test_k_larger_than_vocab_keeps_whole_vocab_within_top_p():
    logits = torch.tensor([1.0, 1.5, 0.5])
    c = select_candidates(logits, top_k=40, top_p=1.0)
    assert c.token_ids.tolist() == [1, 0, 2]


def test_a_dominant_token_is_the_single_candidate():
    logits = torch.full((100,), -10.0)
    logits[42] = 10.0
    c = select_candidates(logits, top_k=40, top_p=0.95)
    assert c.token_ids.tolist() == [42]


def test_ties_are_ordered_by_token_id_and_kept_at_the_k_boundary():
    logits = torch.zeros(10)
    logits[[7, 3, 5]] = 2.0
    c = select_candidates(logits, top_k=2, top_p=1.0)
    # three tokens tie at the k-th value: transformers' TopK keeps all of them
    assert c.token_ids.tolist() == [3, 5, 7]
    assert c.token_ids.tolist() == hf_candidates(logits, 2, 1.0)
    c = select_candidates(logits, top_k=5, top_p=1.0)
    assert c.token_ids.tolist()[:3] == [3, 5, 7]


def test_log_softmax_is_float32_even_for_half_logits():
    torch.manual_seed(2)
    logits = (torch.randn(300) * 4).to(torch.bfloat16)
    c = select_candidates(logits, 40, 0.95)
    assert c.probs.dtype == torch.float32
    assert c.token_ids.tolist() == hf_candidates(logits.float(), 40, 0.95)

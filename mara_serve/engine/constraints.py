"""Token constraints (structured outputs): which tokens may come next, per request.

A `TokenConstraint` is a per-request state machine over token ids (the server builds one per
choice from a JSON schema, a regex or a choice list; server/serving/structured.py). The engine
masks the row's logits with `allowed()` BEFORE candidate selection, so in MARA mode the agent
judges only tokens the grammar allows and "all rejected → top-1" emits the top-1 *allowed*
token (docs/algorithm.md §9); after a token is emitted it `accept`s it, and once `done` (the
grammar is complete and nothing may follow) the choice finishes with "stop".
"""

from __future__ import annotations

from typing import Protocol

import torch


class TokenConstraint(Protocol):
    def allowed(self) -> torch.Tensor:
        """Bool (V,) on the CPU: the tokens that may come next (V: the model's vocabulary)."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past an emitted token; raises ValueError if the token was not allowed."""
        ...

    @property
    def done(self) -> bool:
        """The output is complete: no token may follow."""
        ...


def constrain_logits(logits: torch.Tensor, constraint: TokenConstraint) -> torch.Tensor:
    """A copy of `logits` (V,) with the disallowed tokens at -inf; raises ValueError when the
    constraint allows nothing (a grammar in an error state)."""
    allowed = constraint.allowed().to(logits.device)
    if not bool(allowed.any()):
        raise ValueError("the output constraint allows no further token")
    return logits.masked_fill(~allowed, float("-inf"))

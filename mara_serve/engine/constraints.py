"""Token constraints (structured outputs): which tokens may come next, per request.

A `TokenConstraint` is a per-request state machine over token ids (the server builds one per
choice from a JSON schema, a regex or a choice list; server/serving/structured.py). The engine
masks the row's logits with `allowed()` BEFORE candidate selection, so in MARA mode the agent
judges only tokens the grammar allows and "all rejected → top-1" emits the top-1 *allowed*
token; after a token is emitted it `accept`s it. A complete output allows only the
end-of-sequence token, so the choice ends like any other, at EOS, with "stop".
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


def constrain_logits(logits: torch.Tensor, constraint: TokenConstraint) -> torch.Tensor:
    """A copy of `logits` (V,) with the disallowed tokens at -inf; raises ValueError when the
    constraint allows nothing (a grammar in an error state)."""
    allowed = constraint.allowed().to(logits.device)
    if not bool(allowed.any()):
        raise ValueError("the output constraint allows no further token")
    return logits.masked_fill(~allowed, float("-inf"))

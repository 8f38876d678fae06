"""Per-row decoding state of one running request (`Sequence`)."""

from __future__ import annotations

import torch

from mara_serve.engine.request import Request, TokenTrace
from mara_serve.engine.sampling import make_generator


class Sequence:
    """A request admitted into the running batch.

    Invariants: the KV cache slot `slot` holds `length` positions (prompt + committed tokens),
    and one more while the row is `undecided` (its rank-0 candidate's K/V at `length`, step.py);
    `next_logits` (V,) are the logits of position `length`.
    """

    def __init__(self, request: Request, slot: int, eos_token_ids: tuple[int, ...], device):
        self.request = request
        self.params = request.params
        self.agent = request.agent
        self.constraint = request.constraint
        self.slot = slot
        self.length = 0
        self.output_ids: list[int] = []
        self.next_logits: torch.Tensor | None = None
        self.generator = make_generator(request.params.seed, device)
        stop = set(request.params.stop_token_ids)
        if not request.params.ignore_eos:
            stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        self.finish_reason: str | None = None
        self.first_scheduled_time: float | None = None
        self.reported_queue_time = False
        # EMAs of "the agent accepted the top-1" and "rejected everything" (cost hints, step.py)
        self.rank0_rate = 0.5
        self.fallback_rate = 0.0
        # The candidate rounds of a token not decided yet (step.py's `StepRow`); None between
        # tokens.
        self.undecided = None
        # A plain token sent before this step's forward and not recorded yet (engine `_plan`).
        self.sent_ahead: TokenTrace | None = None

    @property
    def kv_length(self) -> int:
        """Cache positions of this row that must be kept (moved with it): see the invariants."""
        return self.length + (self.undecided is not None)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def finish_reason_after(self, token_id: int) -> str | None:
        """Why the sequence ends once `token_id` is appended (None: it goes on)."""
        if token_id in self.stop_ids:
            return "stop"
        if len(self.output_ids) + 1 >= self.params.max_new_tokens:
            return "length"
        return None

    def accept_constrained(self, token_id: int) -> None:
        """Advance the output constraint by `token_id` (raises if it refuses the token)."""
        if self.constraint is not None:
            self.constraint.accept(token_id)

    def append(self, token_id: int, trace: TokenTrace, accepted: bool = False) -> None:
        """Record an emitted token and decide whether the sequence is finished. `accepted`:
        the constraint already took the token (`accept_constrained`, before it was sent)."""
        reason = self.finish_reason_after(token_id)
        if not accepted:
            self.accept_constrained(token_id)
        self.output_ids.append(token_id)
        self.length += 1
        if reason is not None:
            self.finish_reason = reason

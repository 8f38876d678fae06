"""What flows in and out of the engine: `Request`, per-token `TokenTrace`, `RequestOutput`.

The engine knows token ids only; text, chat templates and stop strings belong to the server.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mara_serve.engine.agent import Agent
from mara_serve.engine.constraints import TokenConstraint
from mara_serve.engine.sampling import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    agent: Agent | None = None  # pinned at submission: a registry swap never changes it
    # Structured output (constraints.py): one state machine per request, never shared.
    constraint: TokenConstraint | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TokenTrace:
    """How one token was chosen (docs/algorithm.md §3).

    `candidates`/`accept_probs` list the candidates the agent judged, in order, up to and
    including the accepted one (all of them on fallback), with the agent's accept probability
    and the model's own probability of each. `accepted_rank` is the emitted
    token's rank in the candidate list; `fallback` means every candidate was rejected and the
    top-1 was emitted (the last candidate for a `fallback_last` training agent). A plain
    (agent-less) token has num_candidates 1 and no decisions.
    """

    token_id: int
    num_candidates: int
    accepted_rank: int
    accept_prob: float | None
    fallback: bool
    candidates: tuple[int, ...] = ()
    accept_probs: tuple[float, ...] = ()
    llm_probs: tuple[float, ...] = ()  # the model's renormalised top-k probs of `candidates`
    # With SamplingParams.logprobs: the token's log-probability under the model (full
    # vocabulary, sampling.token_logprobs) and the top alternatives as (token id, logprob).
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()

    @property
    def evaluated(self) -> int:
        """Candidates the agent judged for this token (the serial algorithm's forward count)."""
        return len(self.candidates)

    @property
    def rejected(self) -> int:
        return self.evaluated - (0 if self.fallback or not self.candidates else 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["logprob"], d["top_logprobs"]  # reported as OpenAI `logprobs`, not in the trace
        for key in ("candidates", "accept_probs", "llm_probs"):
            d[key] = list(d[key])
        d["evaluated"], d["rejected"] = self.evaluated, self.rejected
        return d


@dataclass
class RequestOutput:
    """A delta: the tokens produced for one request since its last output."""

    request_id: str
    new_token_ids: list[int]
    traces: list[TokenTrace]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    queue_time: float | None = None  # seconds waiting before prefill (set on the first output)

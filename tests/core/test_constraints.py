"""Output constraints mask the logits before candidate selection: the agent judges allowed
tokens only, a reject-all agent falls back to the top-1 ALLOWED token, and the engine matches
the serial reference under the same constraint."""

from __future__ import annotations

import torch
from tiny_models import VOCAB, tiny_llama

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams

EOS = 1  # tiny_llama's


class EvenTokens:
    """`length` even token ids, then only EOS (a complete output)."""

    def __init__(self, length: int):
        self.length, self.seen = length, []

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(VOCAB, dtype=torch.bool)
        if len(self.seen) < self.length:
            mask[::2] = True
        else:
            mask[EOS] = True
        return mask

    def accept(self, token_id: int) -> None:
        if not self.allowed()[token_id]:
            raise ValueError(f"token {token_id} is not allowed")
        self.seen.append(token_id)


def test_constrained_rows_match_the_reference_and_only_emit_allowed_tokens(agents):
    lm = tiny_llama()
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    engine = LLMEngine(lm, EngineConfig(max_running=4))
    modes = ("half", "reject", None, "accept")
    reqs = [Request(f"r{i}", [0, 5 + i, 9], params, agents.get(m) if m else None,
                    constraint=EvenTokens(6 + i)) for i, m in enumerate(modes)]  # fmt: skip
    reqs.append(Request("free", [0, 5, 9], params, agents["half"]))  # unconstrained neighbour
    results = engine.generate(reqs)
    for i, r in enumerate(reqs):
        ids, traces, reason = results[r.request_id]
        constraint = EvenTokens(6 + i) if r.constraint is not None else None
        want, want_traces = reference_generate(lm.model, r.prompt_token_ids, r.agent, params,
                                               (1,), constraint)  # fmt: skip
        assert ids == want, r.request_id
        if r.constraint is None:
            continue
        assert all(t % 2 == 0 for t in ids[:-1]) and len(ids) == 7 + i and reason == "stop"
        assert ids[-1] == EOS
        for t in traces:  # the agent was only ever offered allowed tokens
            assert all(c % 2 == 0 for c in t.candidates)
    reject = results["r1"][1]
    assert any(t.fallback for t in reject)
    for t in reject[:-1]:  # all rejected → the top-1 allowed token (even)
        assert t.fallback and t.token_id == t.candidates[0]

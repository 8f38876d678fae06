"""`mara_trace` entries: the engine's `TokenTrace` plus the texts of the token and candidates."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from mara_serve.engine.request import TokenTrace


class TraceRenderer:
    def __init__(self, tokenizer: Any):
        # One token's text; candidates repeat a lot across steps, so cache by id.
        self.token_text = lru_cache(maxsize=65536)(
            lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)
        )

    def render(self, traces: list[TokenTrace]) -> list[dict[str, Any]]:
        out = []
        for t in traces:
            d = t.to_json()
            d["token"] = self.token_text(t.token_id)
            d["candidate_tokens"] = [self.token_text(c) for c in t.candidates]
            out.append(d)
        return out

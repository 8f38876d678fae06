"""OpenAI `logprobs` from the engine's per-token log-probabilities (`TokenTrace.logprob`).

Chat: `choices[i].logprobs.content[j] = {token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}`; completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}],
text_offset}`. Streamed chunks carry the entries of their own tokens. A token's `token` is its
text decoded alone; `bytes` are its exact UTF-8 bytes — for a byte-level BPE token that holds
part of a character (an emoji split over tokens) they are the raw bytes, so a client can join
them, while `token` shows U+FFFD.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from mara_serve.engine.request import TokenTrace
from mara_serve.server.protocol.common import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (each byte 0-255 as one printable character), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


class LogprobRenderer:
    def __init__(self, tokenizer: Any, token_text: Callable[[int], str]):
        """`token_text`: one token's text, cached (the trace renderer's, shared)."""
        self.tokenizer = tokenizer
        self.text = token_text
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> list[int]:
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        text = self.text(token_id)
        if isinstance(raw, str) and raw and all(c in _BYTES for c in raw) and raw != text:
            return list(bytes(_BYTES[c] for c in raw))  # a byte-level BPE token
        return list(text.encode("utf-8"))

    def _top(self, t: TokenTrace) -> list[TopLogprob]:
        return [TopLogprob(token=self.text(i), logprob=lp, bytes=self.bytes(i))
                for i, lp in t.top_logprobs]  # fmt: skip

    def chat(self, traces: list[TokenTrace]) -> ChatChoiceLogprobs:
        return ChatChoiceLogprobs(content=[
            ChatTokenLogprob(token=self.text(t.token_id), logprob=t.logprob or 0.0,
                             bytes=self.bytes(t.token_id), top_logprobs=self._top(t))
            for t in traces
        ])  # fmt: skip

    def prompt_completion(self, ids: list[int], rows: list[Any], k: int) -> CompletionLogprobs:
        """OpenAI's echo with logprobs: the prompt's entries (`rows` from
        engine/prompt_logprobs.py; the first token has no context: null), offsets from 0 in
        the echoed text."""
        tokens = [self.text(i) for i in ids]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None if r is None else r.logprob for r in rows],
            top_logprobs=[
                None if r is None else {self.text(i): lp for i, lp in r.top[:k]} for r in rows
            ],  # fmt: skip
            text_offset=_offsets(tokens, 0),
        )

    def completion(self, traces: list[TokenTrace], offset: int) -> CompletionLogprobs:
        """Entries for `traces`, whose text starts at `offset` in the choice's text."""
        tokens = [self.text(t.token_id) for t in traces]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[t.logprob or 0.0 for t in traces],
            top_logprobs=[{self.text(i): lp for i, lp in t.top_logprobs} for t in traces],
            text_offset=_offsets(tokens, offset),
        )


def _offsets(tokens: list[str], start: int) -> list[int]:
    """Each token's character offset, the first at `start`."""
    out = []
    for tok in tokens:
        out.append(start)
        start += len(tok)
    return out

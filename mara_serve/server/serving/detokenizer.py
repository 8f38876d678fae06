"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
U+FFFD. We keep two offsets into the ids (TGI/vLLM's scheme): text is emitted only once the
decoded window no longer ends in U+FFFD, and each delta is the window's text minus the text of
its already-emitted prefix — decoding a window rather than single tokens keeps the spaces that
SentencePiece tokenizers attach to the *following* token. A few prompt ids seed the window for
the same reason. `flush` at the end releases whatever is still held, except the bytes of a
character the generation cut in half (max_tokens reached inside an emoji): those are dropped, so
the text never ends in U+FFFD — the completion's token count still includes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROMPT_CONTEXT = 5  # prompt ids decoded along with the first tokens (leading-space handling)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):  # fmt: skip
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.ids)  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated ids; returns the newly complete text (maybe empty)."""
        if not token_ids:
            return ""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back (the generation ended), without a trailing incomplete
        character (push held these ids only because their text ended in U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        held = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        return held.rstrip("\ufffd")

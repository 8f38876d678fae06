"""Stop strings over a text stream: the stop text is never emitted, even split across tokens.

Text is released only when it cannot be the start of a stop string: after each push we hold
back the longest suffix that is a prefix of some stop string (at most len(longest stop) - 1
characters). A stop string therefore can never begin in text already released, and the first
full match anywhere in the buffer ends the choice with everything before it.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str], include: bool = False):
        """`include`: the matched stop string ends the text instead of being cut (vLLM's
        include_stop_str_in_output)."""
        self.stops = [s for s in stops if s]
        self.include = include
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.buffer += text
        hits = [(i, s) for i, s in ((self.buffer.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            i, stop = min(hits, key=lambda h: h[0])
            end = i + len(stop) if self.include else i
            out, self.buffer = self.buffer[:end], ""
            return out, True
        keep = self._held_suffix_len()
        cut = len(self.buffer) - keep
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text, once the stream ended without a stop string."""
        out, self.buffer = self.buffer, ""
        return out

    def _held_suffix_len(self) -> int:
        buf = self.buffer
        for k in range(min(len(buf), max(len(s) for s in self.stops) - 1), 0, -1):
            suffix = buf[-k:]
            if any(s.startswith(suffix) for s in self.stops):
                return k
        return 0

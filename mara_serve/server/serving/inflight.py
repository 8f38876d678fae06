"""`InflightRequests`: generation requests admitted, not yet answered (what a drain waits for)."""

from __future__ import annotations

import asyncio


class InflightRequests:
    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self) -> None:
        self.count += 1
        self._idle.clear()

    def done(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every request finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

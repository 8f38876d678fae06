"""The agent registry: name → loaded, immutable agent with a version.

Loading, replacing and unloading are atomic (one lock, whole-object swaps). A request pins the
`Agent` object it resolved at submission, so a later swap never changes or fails it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mara_serve.engine.agent import Agent, load_agent
from mara_serve.engine.errors import AgentLoadError


@dataclass(frozen=True)
class AgentEntry:
    name: str
    agent: Agent
    version: int
    loaded_at: float  # unix time
    source: str


class AgentRegistry:
    def __init__(self, hidden_size: int, device: torch.device | str = "cpu"):
        self.hidden_size = hidden_size
        self.device = device
        self._entries: dict[str, AgentEntry] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path) -> AgentEntry:
        """Load (or replace) `name` from `path`. The old agent stays in place if loading fails."""
        if not name or "/" in name:
            raise AgentLoadError(f"invalid agent name {name!r}")
        agent = load_agent(path, name=name, expected_hidden_size=self.hidden_size,
                           device=self.device)  # fmt: skip
        return self.put(name, agent, str(path))

    def put(self, name: str, agent: Agent, source: str = "") -> AgentEntry:
        if agent.hidden_size != self.hidden_size:
            raise AgentLoadError(f"agent hidden size {agent.hidden_size} does not match the base "
                                 f"model's hidden size {self.hidden_size}")  # fmt: skip
        with self._lock:
            version = self._versions.get(name, 0) + 1
            self._versions[name] = version
            entry = AgentEntry(name, agent, version, time.time(), source)
            self._entries[name] = entry
        return entry

    def unload(self, name: str) -> AgentEntry | None:
        with self._lock:
            return self._entries.pop(name, None)

    def get(self, name: str) -> AgentEntry | None:
        with self._lock:
            return self._entries.get(name)

    def list(self) -> list[AgentEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

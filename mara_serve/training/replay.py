"""The replay buffer: a ring of cached candidate states and their transitions.

Each transition's state is the candidate state the engine already computed during the episode
(no forward is ever repeated for training). Whole episodes are appended contiguously, so the
next state of transition i is the state at i + 1 — stored once, not twice — except after a
terminal transition, where it is never read (`done` masks the bootstrap). Eviction is
first-in first-out; overwriting the oldest transitions only ever breaks the link from the newest
transition, which is always terminal, so no stale next state is used.

Storage grows by doubling up to `capacity` (the paper's 1e6 × 4096 floats would be 16 GB;
a short run never pays for room it does not use).
"""

from __future__ import annotations

import torch

from mara_serve.training.episodes import Transitions


class ReplayBuffer:
    def __init__(self, capacity: int, state_dim: int, device: torch.device | str = "cpu"):
        if capacity < 2:
            raise ValueError("replay capacity must be at least 2")
        self.capacity, self.state_dim, self.device = capacity, state_dim, torch.device(device)
        self.states = torch.empty(0, state_dim, device=self.device)
        self.actions = torch.empty(0, dtype=torch.int64, device=self.device)
        self.rewards = torch.empty(0, device=self.device)
        self.dones = torch.empty(0, dtype=torch.bool, device=self.device)
        self.size = 0  # valid transitions
        self.pos = 0  # next write position
        self.total_added = 0

    def __len__(self) -> int:
        return self.size

    def _grow(self, needed: int) -> None:
        allocated = self.states.shape[0]
        if needed <= allocated or allocated == self.capacity:
            return
        new = min(self.capacity, max(needed, 2 * allocated, 1024))
        extra = new - allocated
        self.states = torch.cat([self.states, self.states.new_zeros(extra, self.state_dim)])
        self.actions = torch.cat([self.actions, self.actions.new_zeros(extra)])
        self.rewards = torch.cat([self.rewards, self.rewards.new_zeros(extra)])
        self.dones = torch.cat([self.dones, self.dones.new_ones(extra)])

    def add(self, block: Transitions) -> None:
        """Append whole episodes (their last transition must be terminal)."""
        n = len(block)
        if n == 0:
            return
        if not bool(block.dones[-1]):
            raise ValueError("a block must end with a terminal transition (whole episodes)")
        if n > self.capacity:  # keep the newest whole-capacity tail
            block = Transitions(
                *(
                    getattr(block, f)[-self.capacity :]
                    for f in ("states", "actions", "rewards", "dones")
                )
            )
            n = self.capacity
        self._grow(self.size + n)
        idx = (self.pos + torch.arange(n)) % self.capacity
        idx = idx.to(self.device)
        self.states[idx] = block.states.to(self.device, torch.float32)
        self.actions[idx] = block.actions.to(self.device)
        self.rewards[idx] = block.rewards.to(self.device)
        self.dones[idx] = block.dones.to(self.device)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.total_added += n

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """Uniform minibatch: (states, actions, rewards, next_states, dones)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        i = torch.randint(self.size, (batch_size,), generator=generator).to(self.device)
        if self.size == self.capacity:  # full ring: index 0 is the oldest at `pos`
            i = (self.pos + i) % self.capacity
        nxt = (i + 1) % max(self.states.shape[0], 1)
        return self.states[i], self.actions[i], self.rewards[i], self.states[nxt], self.dones[i]

    def state_dict(self) -> dict:
        n = self.size
        order = (torch.arange(n) + (self.pos if n == self.capacity else 0)) % self.capacity
        order = order.to(self.device)
        return {
            "states": self.states[order].cpu(),
            "actions": self.actions[order].cpu(),
            "rewards": self.rewards[order].cpu(),
            "dones": self.dones[order].cpu(),
            "total_added": self.total_added,
        }

    def load_state_dict(self, state: dict) -> None:
        self.__init__(self.capacity, self.state_dim, self.device)
        n = int(state["actions"].numel())
        if n:
            dones = state["dones"].clone()
            dones[-1] = True  # the saved tail is the end of the newest episode
            self.add(Transitions(state["states"], state["actions"], state["rewards"], dones))
        self.total_added = int(state["total_added"])

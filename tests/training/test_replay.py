"""The replay buffer: next states by position, ring eviction, save and restore."""

from __future__ import annotations

import pytest
import torch

from mara_serve.training.episodes import Transitions
from mara_serve.training.replay import ReplayBuffer


def _episode(first_id: int, n: int) -> Transitions:
    """n transitions whose state vectors hold their global ids (state[0] == id)."""
    states = torch.arange(first_id, first_id + n, dtype=torch.float32)[:, None].repeat(1, 4)
    dones = torch.zeros(n, dtype=torch.bool)
    dones[-1] = True
    return Transitions(states, torch.ones(n, dtype=torch.int64), torch.zeros(n), dones)


def _check_links(buf: ReplayBuffer, batch: int = 512) -> set[int]:
    s, _, _, s_next, done = buf.sample(batch, torch.Generator().manual_seed(0))
    ids = s[:, 0].long()
    live = ~done
    assert torch.equal(s_next[live, 0].long(), ids[live] + 1)  # the next state in the episode
    return set(ids.tolist())


def test_next_state_is_the_following_transition_of_the_episode():
    buf = ReplayBuffer(100, 4)
    buf.add(_episode(0, 5))
    buf.add(_episode(100, 3))
    assert len(buf) == 8
    assert _check_links(buf) == {0, 1, 2, 3, 4, 100, 101, 102}


def test_ring_evicts_the_oldest_and_keeps_links_valid():
    buf = ReplayBuffer(10, 4)
    for k in range(5):  # 5 episodes × 4 transitions into 10 slots
        buf.add(_episode(100 * k, 4))
    assert len(buf) == 10 and buf.total_added == 20
    assert _check_links(buf) == {202, 203, 300, 301, 302, 303, 400, 401, 402, 403}


def test_blocks_must_end_an_episode():
    t = _episode(0, 3)
    t.dones[-1] = False
    with pytest.raises(ValueError, match="terminal"):
        ReplayBuffer(10, 4).add(t)


def test_state_dict_round_trip_gives_the_same_samples():
    buf = ReplayBuffer(10, 4)
    for k in range(4):
        buf.add(_episode(100 * k, 3))
    restored = ReplayBuffer(10, 4)
    restored.load_state_dict(buf.state_dict())
    assert len(restored) == len(buf) and restored.total_added == buf.total_added
    for key, value in buf.state_dict().items():
        other = restored.state_dict()[key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    _check_links(restored)

"""A preallocated KV cache with one slot per running sequence.

Layout: keys and values are (L, S, Hkv, C, d) tensors (layers, slots, kv heads, capacity, head
dim). Slot s holds sequence s's prefix at positions [0, length); positions past the length are
scratch (a step's candidates) and are never read unmasked. Capacity grows by doubling up
to the model's context length, so short requests never pay for a full-context allocation.

Invariants: the engine keeps running sequences in slots 0..B-1 (dense), so a decode step reads
`keys[l, :B, :, :T]` as a view with no gather; `move` keeps it dense when a sequence leaves.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
        max_len: int, dtype: torch.dtype, device: torch.device, initial_capacity: int = 256,
    ):  # fmt: skip
        self.num_slots = num_slots
        self.max_len = max_len
        self._shape = (num_layers, num_slots, num_kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.capacity = 0
        self.keys = self.values = torch.empty(0)
        self.ensure_capacity(min(initial_capacity, max_len))

    def ensure_capacity(self, length: int) -> None:
        """Make positions [0, length) addressable in every slot (amortised doubling)."""
        if length <= self.capacity:
            return
        new_cap = min(self.max_len, max(length, 2 * self.capacity, 16))
        L, S, Hkv, _, d = self._shape
        keys = torch.zeros(L, S, Hkv, new_cap, d, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        if self.capacity:
            keys[:, :, :, : self.capacity] = self.keys
            values[:, :, :, : self.capacity] = self.values
        self.keys, self.values, self.capacity = keys, values, new_cap

    def prefix(self, layer: int, slots: torch.Tensor | int, length: int):
        """Keys and values (R, Hkv, T, d) of the first `length` positions of `slots`.

        An int means the dense slots 0..slots-1 (a view); a tensor gathers those slots (a copy).
        """
        if isinstance(slots, int):
            return self.keys[layer, :slots, :, :length], self.values[layer, :slots, :, :length]
        return (self.keys[layer].index_select(0, slots)[:, :, :length],
                self.values[layer].index_select(0, slots)[:, :, :length])  # fmt: skip

    def move_positions(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """In every layer, copy position src[m] of slot slots[m] to position dst[m]."""
        # Advanced indices separated by a slice put the indexed dim first: (M, L, Hkv, d).
        self.keys[:, slots, :, dst] = self.keys[:, slots, :, src]
        self.values[:, slots, :, dst] = self.values[:, slots, :, src]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions into slot dst."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

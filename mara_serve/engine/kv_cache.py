"""The KV cache: one slot per running sequence, allocated once from a memory budget.

Layout: keys and values are (L, S, Hkv, C, d) tensors (layers, slots, kv heads, positions per
slot, head dim). Slot s holds sequence s's prefix at positions [0, length); positions past the
length are scratch (a step's candidates, `scratch` positions past the longest sequence) and
are never read unmasked. Nothing grows during a step: `KVPlan.fit` sizes slots and context from
the budget before the first request, and the engine admits a request only into a free slot
(each slot holds one full-length sequence), so admission is checked against the budget.

Memory: on a GPU the tensors are allocated up front (`torch.zeros`, as vLLM does). On a CPU
they live in an anonymous memory mapping: the kernel hands out zero pages as positions are
first written, so the process's resident memory grows with the longest sequences actually
served, never past the budget — an 8k-context budget costs nothing until 8k-token sequences
arrive. (Zeros matter: a masked score is `q·k - inf`, and garbage k could be NaN.)

Invariants: the engine keeps running sequences in slots 0..B-1 (dense), so a decode step reads
`keys[l, :B, :, :T]` as a view with no gather; `move` keeps it dense when a sequence leaves.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch


def bytes_per_position(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """K and V of one token in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class KVPlan:
    """How a budget is spent: `slots` sequences of up to `max_len` tokens each (plus `scratch`
    positions), `bytes` in all. `notes` say what the budget forced (logged at start-up)."""

    slots: int
    max_len: int
    scratch: int
    bytes: int
    notes: tuple[str, ...] = ()

    @classmethod
    def fit(
        cls,
        budget: int | None,
        per_position: int,
        max_len: int,
        max_slots: int,
        scratch: int,
        reserved: int = 0,
    ) -> KVPlan:
        """The most slots (≤ `max_slots`) of `max_len + scratch` positions that fit in
        `budget - reserved` bytes (None: no limit). When not even one full-length sequence
        fits, one slot with a shorter context (`max_len` capped); when not even a minimal
        one fits, ValueError."""
        full = (max_len + scratch) * per_position
        if budget is None:
            return cls(max_slots, max_len, scratch, max_slots * full)
        room = budget - reserved
        notes = []
        slots = min(max_slots, room // full) if room > 0 else 0
        if slots >= 1:
            if slots < max_slots:
                notes.append(
                    f"the KV cache budget ({size(budget)}) holds {slots} sequence(s) of "
                    f"{max_len} tokens: at most {slots} request(s) run at once (not "
                    f"{max_slots}); raise --kv-cache-memory or lower --max-model-len for more"
                )
            return cls(slots, max_len, scratch, slots * full, tuple(notes))
        capped = (room // per_position) - scratch if room > 0 else 0
        if capped < 16:
            raise ValueError(
                f"the KV cache budget ({size(budget)}) is too small: {size(reserved)} of it is "
                f"reserved and one sequence needs {per_position} bytes per token plus "
                f"{scratch} scratch positions; raise --kv-cache-memory"
            )
        notes.append(
            f"the KV cache budget ({size(budget)}) cannot hold one sequence of {max_len} tokens: "
            f"max_model_len capped to {capped} (raise --kv-cache-memory for the model's full "
            "context)"
        )
        return cls(1, int(capped), scratch, (capped + scratch) * per_position, tuple(notes))


GPU_ACTIVATION_RESERVE = 2 * 2**30  # left free for a step's activations (scores, MLP, LM head)


def kv_budget(
    kv_cache_memory: int | None, gpu_memory_utilization: float, device: torch.device
) -> int | None:
    """The KV cache's byte budget: `kv_cache_memory` when given; on a GPU, the share of the
    device's memory `gpu_memory_utilization` allows that is still free now (after the weights,
    and whatever else runs on the device), minus a reserve for activations; on a CPU, None
    (every slot holds a full-length sequence; pages are committed only as they are written)."""
    if kv_cache_memory is not None:
        return kv_cache_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(gpu_memory_utilization * total) - (total - free) - GPU_ACTIVATION_RESERVE
    return None


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """A zero tensor; on a CPU backed by an anonymous mapping committed page by page on first
    write (returns the tensor and the mapping, which must outlive it)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device), None
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype), None
    # Anonymous and private: zero-filled by the kernel page by page on first touch. NORESERVE:
    # the kernel's overcommit heuristic does not refuse a large, mostly untouched mapping.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    buf = mmap.mmap(-1, nbytes, flags=flags)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape), buf


class KVCache:
    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, plan: KVPlan,
        dtype: torch.dtype, device: torch.device,
    ):  # fmt: skip
        self.num_slots = plan.slots
        self.max_len = plan.max_len  # the longest sequence a slot holds
        self.capacity = plan.max_len + plan.scratch  # positions per slot
        self.dtype, self.device = dtype, device
        shape = (num_layers, plan.slots, num_kv_heads, self.capacity, head_dim)
        self.keys, self._keys_map = _zeros(shape, dtype, device)
        self.values, self._values_map = _zeros(shape, dtype, device)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def check(self, length: int) -> None:
        """Positions [0, length) must exist in every slot (the engine's validation and the
        scratch margin guarantee it; a failure here is a bug, never a reason to grow)."""
        if length > self.capacity:
            raise ValueError(f"KV position {length} is past the slot capacity {self.capacity}")

    def prefix(self, layer: int, slots: torch.Tensor | int, length: int):
        """Keys and values (R, Hkv, T, d) of the first `length` positions of `slots`.

        An int means the dense slots 0..slots-1 (a view); a tensor gathers those slots (a copy).
        """
        if isinstance(slots, int):
            return self.keys[layer, :slots, :, :length], self.values[layer, :slots, :, :length]
        # slice before gathering: the copy holds `length` positions, not the slot's capacity
        return (self.keys[layer, :, :, :length].index_select(0, slots),
                self.values[layer, :, :, :length].index_select(0, slots))  # fmt: skip

    def move_positions(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """In every layer, copy position src[m] of slot slots[m] to position dst[m]."""
        # Advanced indices separated by a slice put the indexed dim first: (M, L, Hkv, d).
        self.keys[:, slots, :, dst] = self.keys[:, slots, :, src]
        self.values[:, slots, :, dst] = self.values[:, slots, :, src]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions into slot dst."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

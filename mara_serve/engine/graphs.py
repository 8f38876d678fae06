"""The decode step's forward over padded shape buckets, replayed as CUDA graphs on a GPU.

An eager forward of an 8B model launches ~1,000 kernels; at small batch the host takes longer
to launch them than the GPU takes to run them. A CUDA graph launches a whole forward at once,
but fixes every shape: rows R, candidates per row K (the grid is R x K) and keys read S. So each
decode forward is padded up to a bucket (R_b, K_b, S_b), and one graph per bucket is captured
the first time it is needed (least recently used ones are dropped past `max_graphs`).

Padding never touches a real token, by construction:
- a padding cell (past a row's candidates, or any cell of a padding row) stores its K/V at the
  last position of its slot, `capacity - 1`, which no real token uses: a real token's store
  position is length + rank <= (max_len - 1) + (MAX_CANDIDATES - 1) = capacity - 2;
- a padding cell's query sees key S_b - 1 only (runner._tree_mask clamps its position), so it
  yields a finite, ignored output; real queries see their row's prefix and their own position;
- padding rows of a dense grid use the free slot numbers R..R_b-1 (R_b <= the cache's slots).
Attention reads S_b >= S keys, the extra ones masked: at most ~1.5x the keys needed.

On a CPU the same padded shapes run eagerly when enabled (no graphs; no gain) so that tests
check padded == unpadded without a GPU. The prefill stays eager (large and GPU-bound).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mara_serve.engine.kv_cache import KVCache

# Candidates per row: steps of ~1.5x, so a round of 40 candidates pads to 40, not 64.
CANDIDATE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128, 192, 256)
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_KEYS = 256


def bucket(n: int, sizes: tuple[int, ...], cap: int) -> int:
    """The smallest size >= n (cap where none is, or where it is larger than cap)."""
    return min(next((s for s in sizes if s >= n), cap), cap)


def key_bucket(n: int, cap: int) -> int:
    """Keys read: 256, 384, 512, 768, 1024, 1536… (powers of two and 1.5x them), <= cap."""
    size = MIN_KEYS
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return min(size, cap)


def pack_inputs(lengths: list[int], tokens: list[int], row_of: list[int], col_of: list[int],
                rank_of: list[int], slots: list[int] | None = None) -> list[int]:  # fmt: skip
    """A decode forward's integer inputs in one list (one host→device copy), in the order
    `run_packed` splits them; `slots` only when the rows are not the dense slots 0..R-1."""
    return lengths + tokens + row_of + col_of + rank_of + (slots or [])


def run_packed(forward: Callable[..., torch.Tensor], inputs: torch.Tensor, num_rows: int,
               num_tokens: int, kmax: int, num_keys: int, dense: bool) -> torch.Tensor:  # fmt: skip
    """`forward` (ModelRunner.forward_tokens) on inputs packed by `pack_inputs`."""
    n = num_tokens
    lengths, tok, row_of, col_of, rank, *slots = inputs.split(
        [num_rows, n, n, n, n] + ([] if dense else [num_rows])
    )
    return forward(num_rows if dense else slots[0], lengths, tok, row_of, col_of, kmax, rank,
                   num_keys=num_keys)  # fmt: skip


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # the packed int64 inputs the graph reads (copied in before replay)
    output: torch.Tensor  # (R_b * K_b, H), overwritten by every replay of the pool


class PaddedForward:
    """`forward` (ModelRunner.forward_tokens) over padded buckets of `cache`'s slots and
    positions; captured as CUDA graphs when `capture`."""

    def __init__(self, forward: Callable[..., torch.Tensor], cache: KVCache, capture: bool,
                 max_graphs: int = 256, max_tokens: int = 2048):  # fmt: skip
        self.forward = forward
        self.cache = cache
        self.device = cache.device
        self.capture = capture
        self.max_graphs = max_graphs
        self.max_tokens = max_tokens  # larger grids run eagerly unpadded (GPU-bound anyway)
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # forwards served by a graph (or by the padded eager path on a CPU)
        self.captures = 0

    def shape(self, num_rows: int, kmax: int, num_keys: int, dense: bool) -> tuple | None:
        """The bucket (R_b, K_b, S_b, dense) of a forward, or None when it runs unpadded."""
        cache = self.cache
        rows = bucket(num_rows, ROW_BUCKETS, cache.num_slots if dense else num_rows)
        rows = max(rows, num_rows)
        cands = bucket(kmax, CANDIDATE_BUCKETS, kmax)
        if rows * cands > self.max_tokens:
            return None
        return rows, cands, key_bucket(num_keys, cache.capacity), dense

    def __call__(self, slots: list[int], lengths: list[int], tokens: list[int],
                 row_of: list[int], col_of: list[int], rank_of: list[int],
                 shape: tuple) -> torch.Tensor:  # fmt: skip
        """Final hidden states (N, H) of the N packed tokens (as forward_tokens' arguments)."""
        host = torch.tensor(self._padded(shape, slots, lengths, tokens, row_of, col_of, rank_of))
        if self.capture:
            g = self._graph(shape)
            g.inputs.copy_(host)
            g.graph.replay()
            out = g.output
        else:
            out = self._run(host.to(self.device), shape)
        self.replays += 1
        real = [r * shape[1] + c for r, c in zip(row_of, col_of, strict=True)]
        # index_select copies: the next replay of any graph of the pool overwrites `out`
        if len(real) == out.shape[0] and self.capture:
            return out.clone()
        return out.index_select(0, torch.tensor(real, device=out.device))

    def _padded(self, shape: tuple, slots: list[int], lengths: list[int], tokens: list[int],
                row_of: list[int], col_of: list[int], rank_of: list[int]) -> list[int]:  # fmt: skip
        """The bucket's full (R_b, K_b) grid, packed (`pack_inputs`): the real tokens in their
        cells, every other cell padding stored at the last cache position."""
        R_b, K_b, _, dense = shape
        cells = R_b * K_b
        last = self.cache.capacity - 1
        lengths_p = lengths + [0] * (R_b - len(lengths))
        tok = [0] * cells
        rank = [last - lengths_p[c // K_b] for c in range(cells)]
        for r, c, t, k in zip(row_of, col_of, tokens, rank_of, strict=True):
            tok[r * K_b + c], rank[r * K_b + c] = t, k
        slot_p = None if dense else (slots + [slots[0] if slots else 0] * (R_b - len(slots)))
        return pack_inputs(lengths_p, tok, [c // K_b for c in range(cells)],
                           [c % K_b for c in range(cells)], rank, slot_p)  # fmt: skip

    def _run(self, inputs: torch.Tensor, shape: tuple) -> torch.Tensor:
        R_b, K_b, S_b, dense = shape
        return run_packed(self.forward, inputs, R_b, R_b * K_b, K_b, S_b, dense)

    def _graph(self, shape: tuple) -> _Graph:
        g = self.graphs.get(shape)
        if g is not None:
            self.graphs.move_to_end(shape)
            return g
        device = self.device
        # An all-padding grid for warm-up and capture: every write goes to the last position.
        inputs = torch.tensor(self._padded(shape, [], [], [], [], [], []), device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture (workspaces, lazy init)
            self._run(inputs, shape)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self._run(inputs, shape)
        self.captures += 1
        g = self.graphs[shape] = _Graph(graph, inputs, output)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g

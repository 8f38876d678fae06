"""Prefix caching: reuse the K/V of prompt prefixes seen before (vLLM's automatic prefix caching,
at block granularity).

Every chat request of a model starts with the same chat-template tokens (SmolLM2's default
system prompt alone is ~30 tokens), and clients resend whole conversations turn after turn. On a
CPU prefill is the largest part of the time to first token, so recomputing those tokens for
every request is the main cost under concurrency.

Prompts are cut into blocks of `block_size` tokens. A block is keyed by its parent block and its
own tokens — exact token tuples, never a hash alone, so two prompts share a block only when
their whole prefixes are equal — and holds a copy of its K/V for every layer. `match` finds the
longest run of cached blocks a prompt starts with (always leaving at least its last token to
compute, which gives the logits), `load` copies them into a cache slot and `store` keeps the
full blocks of a freshly prefilled prompt. Blocks are evicted least recently used once more
than `max_tokens` tokens are held, the leaves of a chain before the blocks they share (a block
whose parent was evicted anyway is unreachable and ages out).

The cached K/V are the ones a full prefill computes, so decoding continues from the same state;
only the floating-point rounding of the remaining tokens' matmuls can differ in the last bits
(different row counts), as with any batching change. Off (`max_tokens` 0) by default in the
engine; the server turns it on (`MARA_PREFIX_CACHE_TOKENS`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from mara_serve.engine.kv_cache import KVCache


@dataclass
class _Block:
    id: int
    keys: torch.Tensor  # (L, Hkv, block_size, d)
    values: torch.Tensor


class PrefixCache:
    def __init__(self, max_tokens: int, block_size: int = 16):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.max_blocks = max(0, max_tokens) // block_size
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._next_id = 1  # 0 is the root (no parent)
        self.hit_tokens = 0  # prompt tokens served from the cache (cumulative)
        self.queried_tokens = 0  # prompt tokens looked up (cumulative)

    @property
    def enabled(self) -> bool:
        return self.max_blocks > 0

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def _blocks_of(self, token_ids: list[int], limit: int):
        """(key, tokens) of the full blocks within the first `limit` tokens, in order."""
        B = self.block_size
        for start in range(0, limit - limit % B, B):
            yield start, tuple(token_ids[start : start + B])

    def cached_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of the prompt `match` would serve from the cache (a pure
        query: no statistics, no LRU update; the admission budget counts the rest)."""
        if not self.enabled:
            return 0
        n, parent = 0, 0
        for _, tokens in self._blocks_of(token_ids, len(token_ids) - 1):
            block = self._blocks.get((parent, tokens))
            if block is None:
                break
            n, parent = n + self.block_size, block.id
        return n

    def match(self, token_ids: list[int]) -> list[_Block]:
        """The cached blocks the prompt starts with (longest run; never its last token)."""
        if not self.enabled:
            return []
        self.queried_tokens += len(token_ids)
        found: list[_Block] = []
        keys = []
        parent = 0
        for _, tokens in self._blocks_of(token_ids, len(token_ids) - 1):
            block = self._blocks.get((parent, tokens))
            if block is None:
                break
            found.append(block)
            keys.append((parent, tokens))
            parent = block.id
        self._touch(keys)
        self.hit_tokens += len(found) * self.block_size
        return found

    def _touch(self, keys: list) -> None:
        """Mark blocks used, parents after children: eviction (oldest first) takes the leaves
        of a chain before the shared blocks they hang from."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def load(self, cache: KVCache, slot: int, blocks: list[_Block]) -> int:
        """Copy `blocks` into positions [0, n) of `slot`; returns n."""
        B = self.block_size
        n = len(blocks) * B
        if n:
            cache.check(n)
            cache.keys[:, slot, :, :n] = torch.cat([b.keys for b in blocks], dim=2)
            cache.values[:, slot, :, :n] = torch.cat([b.values for b in blocks], dim=2)
        return n

    def store(self, cache: KVCache, slot: int, token_ids: list[int]) -> None:
        """Keep the full blocks of the prompt now in `slot` (its first len(token_ids) positions)."""
        if not self.enabled:
            return
        B = self.block_size
        keys = []
        parent = 0
        for start, tokens in self._blocks_of(token_ids, len(token_ids)):
            key = (parent, tokens)
            block = self._blocks.get(key)
            if block is None:
                block = _Block(
                    self._next_id,
                    cache.keys[:, slot, :, start : start + B].clone(),
                    cache.values[:, slot, :, start : start + B].clone(),
                )
                self._next_id += 1
                self._blocks[key] = block
            keys.append(key)
            parent = block.id
        self._touch(keys)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()

    def stats(self) -> dict:
        return {
            "prefix_cache_tokens": self.num_tokens,
            "prefix_cache_hit_tokens": self.hit_tokens,
            "prefix_cache_queried_tokens": self.queried_tokens,
        }

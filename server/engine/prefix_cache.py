"""Automatic prefix cache: prompt KV kept in fixed-size blocks beside the KV rows, reused by copy.

Most traffic to an adapter repeats a long system prompt; its KV depends on the
tokens before it and on the weights that computed it. So a block of
`BLOCK_TOKENS` prompt tokens is keyed by (its parent block's entry, its token
ids), and a chain's first block by its namespace: (adapter key, merged or not).
The adapter key is the request's opaque key (a re-uploaded adapter has a new
version, so a new key: old KV is never reused); base-only requests share the
namespace of key None; a merged lane computes with other numerics than adapter
math, so it is its own namespace. Entries carry a never-reused id, so a chain
is exact (no hash can collide) and a child whose parent was evicted is simply
unreachable until the LRU takes it.

Reuse is by copy, in both directions: a new sequence copies its longest cached
full-block prefix into its own KV row, and a sequence that finished prefilling
copies its prompt's new full blocks into the pool. Nothing in the pool is ever
referenced by a running sequence, so evicting (LRU over blocks) can never
change a running sequence's output.

Pool memory: `capacity_tokens` × layers × 2 (k, v) × kv_heads × head_dim ×
dtype size, allocated and zeroed when the engine is built: fresh pages touched
later, block by block, would stall the engine thread mid-step (bench/NOTES.md,
"Prefix cache pool").
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from server.engine.kv_cache import KVCache

log = logging.getLogger(__name__)

BLOCK_TOKENS = 32  # prompt tokens per block: the granularity of a cache hit

_Key = tuple[Hashable, tuple[int, ...]]  # (parent entry id, or ("root", namespace); the block's token ids)


@dataclass
class _Entry:
    uid: int  # never reused: a child's key names its parent by it
    block: int  # index into the pool tensors


def namespace(adapter_key: Hashable | None, merged: bool) -> tuple[Hashable | None, bool]:
    """Whose KV a prompt's blocks are: the adapter key (its version included; None = base), and whether a
    merged copy of the base computed it (other numerics than adapter math)."""
    return adapter_key, merged


def pool_bytes(cache: KVCache, capacity_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Device bytes a pool of `capacity_tokens` (whole blocks) beside `cache` takes: the serving reserve counts
    it before sizing adapter slots."""
    k = cache.k[0]  # [rows, kv_heads, max_seq_len, head_dim]
    per_token = 2 * len(cache.k) * k.shape[1] * k.shape[3] * k.element_size()
    return capacity_tokens // block_tokens * block_tokens * per_token


class PrefixCache:
    def __init__(self, cache: KVCache, capacity_tokens: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.cache = cache
        self.block_tokens = block_tokens
        self.num_blocks = capacity_tokens // block_tokens
        self._k: list[torch.Tensor] = []  # per layer [num_blocks, kv_heads, block_tokens, head_dim]
        self._v: list[torch.Tensor] = []
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()  # least recently used first
        self._free = list(range(self.num_blocks))
        self._uids = itertools.count()
        if self.enabled:
            self._allocate()

    @property
    def enabled(self) -> bool:
        return self.num_blocks > 0

    @property
    def cached_blocks(self) -> int:
        return len(self._entries)

    def reserved_bytes(self) -> int:
        """What the pool will hold once allocated."""
        return pool_bytes(self.cache, self.num_blocks * self.block_tokens)

    def cached_tokens(self, namespace: Hashable, prompt: list[int]) -> int:
        """How many tokens of `prompt` `load` would copy now (no LRU change, nothing copied)."""
        parent: Hashable = ("root", namespace)
        b = self.block_tokens
        for i in range((len(prompt) - 1) // b):
            entry = self._entries.get((parent, tuple(prompt[i * b:(i + 1) * b])))
            if entry is None:
                return i * b
            parent = entry.uid
        return (len(prompt) - 1) // b * b

    def load(self, namespace: Hashable, prompt: list[int], row: int) -> int:
        """Copy the longest cached full-block prefix of `prompt` into KV row `row`; its length in tokens.

        At least the prompt's last token is left to prefill, so the logits a sequence samples its first
        token from come from a real forward."""
        blocks = self._chain(namespace, prompt, (len(prompt) - 1) // self.block_tokens, insert=False)
        if not blocks:
            return 0
        n = len(blocks) * self.block_tokens
        self.cache.ensure_initialized([row], n)  # first: zeroing later must not wipe the copy
        index = torch.tensor(blocks, dtype=torch.long, device=self.cache.k[0].device)
        for pool, rows in ((self._k, self.cache.k), (self._v, self.cache.v)):
            for p, t in zip(pool, rows, strict=True):
                got = p.index_select(0, index)  # [blocks, kv_heads, block_tokens, head_dim]
                t[row, :, :n] = got.transpose(0, 1).reshape(t.shape[1], n, t.shape[3])
        return n

    def store(self, namespace: Hashable, prompt: list[int], row: int) -> None:
        """Copy the full prompt blocks of a sequence that finished prefilling into the pool (new ones only)."""
        if not self.enabled:
            return
        count = min(len(prompt) // self.block_tokens, self.num_blocks)
        new: list[tuple[int, int]] = []  # (block index in the prompt, pool block)
        self._chain(namespace, prompt, count, insert=True, new=new)
        if not new:
            return
        b = self.block_tokens
        dst = torch.tensor([block for _, block in new], dtype=torch.long, device=self.cache.k[0].device)
        src = [i for i, _ in new]
        for pool, rows in ((self._k, self.cache.k), (self._v, self.cache.v)):
            for p, t in zip(pool, rows, strict=True):
                heads, dim = t.shape[1], t.shape[3]
                blocks = t[row, :, :count * b].reshape(heads, count, b, dim).transpose(0, 1)  # [count, h, b, d]
                p.index_copy_(0, dst, blocks[src])

    def _chain(self, namespace: Hashable, prompt: list[int], count: int, insert: bool,
               new: list[tuple[int, int]] | None = None) -> list[int]:
        """Pool blocks of the prompt's first `count` blocks as far as they are cached (inserting the rest
        when `insert`, appending each (prompt block, pool block) to `new`); touches every one found."""
        parent: Hashable = ("root", namespace)
        found: list[int] = []
        keys: list[_Key] = []
        b = self.block_tokens
        for i in range(count):
            key = (parent, tuple(prompt[i * b:(i + 1) * b]))
            entry = self._entries.get(key)
            if entry is None:
                if not insert:
                    break
                block = self._take_block(protect=set(keys))
                if block is None:
                    break
                entry = self._entries[key] = _Entry(next(self._uids), block)
                assert new is not None
                new.append((i, block))
            found.append(entry.block)
            keys.append(key)
            parent = entry.uid
        for key in reversed(keys):  # the chain's root ends most recent: children go before their parents
            self._entries.move_to_end(key)
        return found

    def _take_block(self, protect: set[_Key]) -> int | None:
        """A free pool block, evicting the least recently used entry outside `protect` when none is."""
        if self._free:
            return self._free.pop()
        victim = next((k for k in self._entries if k not in protect), None)
        if victim is None:
            return None
        return self._entries.pop(victim).block

    def _allocate(self) -> None:
        """The pool, zeroed so its pages are mapped now. A device without room for it serves on without
        the cache."""
        try:
            for rows, pool in ((self.cache.k, self._k), (self.cache.v, self._v)):
                for t in rows:
                    pool.append(torch.zeros((self.num_blocks, t.shape[1], self.block_tokens, t.shape[3]),
                                            device=t.device, dtype=t.dtype))
        except torch.OutOfMemoryError:
            log.warning("prefix cache: no room for %.1f MiB of KV blocks; serving without it",
                        self.reserved_bytes() / 2**20)
            self._k, self._v, self._free, self.num_blocks = [], [], [], 0

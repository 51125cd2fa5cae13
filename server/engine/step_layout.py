"""StepLayout: where each of a step's tokens goes, planned in Python once, before any tensor is built.

All of a step's tokens are flattened into one row (decode tokens first, then
prefill chunks). The layout says, per token, its id, absolute position, KV row
and adapter slot, which rows sample, and how decode attends:

- eager (CPU's default): decode attends over a slice of contiguous KV rows when
  the decoding rows are close together (holes included: cheaper than copying
  rows out), else over gathered rows; the keys end at the step's longest
  length, and a mask is built only when lengths differ.
- static (CUDA's default; any device when asked): every shape is a function of
  two small numbers only, so a decode step can be replayed from a captured CUDA
  graph. A decode-only step is padded up to a batch bucket (padding tokens
  live in the KV cache's scratch row, attend over one key, and their logits
  are dropped); decode always gathers its rows by index and attends over keys
  up to the longest length rounded up to ZERO_CHUNK, under a length mask kept
  in a persistent buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.adapters.runtime.mapping import BASE_SLOT
from server.engine.kv_cache import ZERO_CHUNK, KVCache
from server.engine.scheduler import StepPlan
from server.engine.step_buffers import bucket_of

# Decode attends over a slice of cache rows (holes included) while it spans at most this
# many rows per decoding sequence; past that, copying the rows out is cheaper.
MAX_SPAN_PER_ROW = 2


@dataclass(frozen=True)
class SpanLayout:
    row: int  # KV-cache row
    start: int  # first index of this chunk in the step's flattened tokens
    length: int
    position: int  # absolute position of the chunk's first token


@dataclass
class StepLayout:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)  # token index of each sampling row (padding rows included)
    num_sampling: int = 0  # real sampling rows: the first num_sampling of keep
    num_decode: int = 0  # decode tokens, padding included
    static: bool = False
    decode_slice: slice | None = None  # eager: the contiguous KV rows decode attends over
    decode_index: list[int] = field(default_factory=list)  # eager slice with holes: each decode row's place
    lengths: list[int] = field(default_factory=list)  # keys each attending decode row sees
    decode_len: int = 0  # keys decode attends over
    prefills: list[SpanLayout] = field(default_factory=list)

    @property
    def keep_identity(self) -> bool:
        """Every token samples, in order (a decode-only step): the LM head takes the hidden rows as they are."""
        return len(self.keep) == len(self.ids)

    @property
    def base_only(self) -> bool:
        return all(s == BASE_SLOT for s in self.slots)

    @property
    def decode_mask_needed(self) -> bool:
        return self.static or (bool(self.lengths) and min(self.lengths) < self.decode_len)

    def zero_rows(self) -> tuple[set[int], int]:
        """(rows, length) the cache must hold finite values for before this step writes."""
        rows = set(self.rows)
        end = max(self.positions) + 1
        return rows, max(end, self.decode_len)

    @classmethod
    def build(cls, plan: StepPlan, cache: KVCache, static: bool, buckets: tuple[int, ...] | None) -> StepLayout:
        out = cls(static=static)
        for s in plan.decode:
            out._token(s.last_token, s.position, s.row, s.slot)
            out.lengths.append(s.position + 1)
        d = len(plan.decode)
        if static and buckets and not plan.prefill:
            for _ in range(bucket_of(d, buckets) - d):
                out._token(0, 0, cache.scratch_row, BASE_SLOT)
                out.lengths.append(1)
        out.num_decode = len(out.ids)
        out.keep = list(range(out.num_decode))
        out.num_sampling = d
        for s, n in plan.prefill:
            start = len(out.ids)
            out.ids.extend(plan.chunk(s, n))
            out.positions.extend(range(s.prefilled, s.prefilled + n))
            out.rows.extend([s.row] * n)
            out.slots.extend([s.slot] * n)
            out.prefills.append(SpanLayout(s.row, start, n, s.prefilled))
            if plan.samples(s, n):
                out.keep.append(len(out.ids) - 1)
                out.num_sampling += 1
        if d:
            out._plan_decode(cache)
        return out

    def _token(self, token: int, position: int, row: int, slot: int) -> None:
        self.ids.append(token)
        self.positions.append(position)
        self.rows.append(row)
        self.slots.append(slot)

    def _plan_decode(self, cache: KVCache) -> None:
        longest = max(self.lengths)
        if self.static:
            self.decode_len = min(-(-longest // ZERO_CHUNK) * ZERO_CHUNK, cache.max_seq_len)
            return
        self.decode_len = longest
        row_ids = self.rows[:self.num_decode]
        lo, hi = min(row_ids), max(row_ids)
        d = self.num_decode
        if row_ids == list(range(lo, lo + d)):
            self.decode_slice = slice(lo, lo + d)
        elif hi - lo + 1 <= MAX_SPAN_PER_ROW * d:
            self.decode_slice = slice(lo, hi + 1)  # holes attend too, cheaper than copying rows out
            self.decode_index = [r - lo for r in row_ids]
            by_row = [longest] * (hi - lo + 1)  # a hole is unmasked (its output is dropped)
            for r, n in zip(row_ids, self.lengths):
                by_row[r - lo] = n
            self.lengths = by_row

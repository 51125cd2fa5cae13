"""The engine's own KV cache: one preallocated, bounded tensor pair per layer.

Shape per layer: `[max_batch + 1, kv_heads, max_seq_len, head_dim]`. A running
sequence owns one row for its whole life (rows 0..max_batch-1); the last row,
`scratch_row`, is never handed out: the padding tokens of a decode step padded
up to a batch bucket write and read there (runner.py). its k/v for absolute position p live
at `[row, :, p]`. Rows are handed out lowest-first so a batch of young
sequences tends to occupy a contiguous block (the attention can then slice
instead of gather).

Memory is allocated with `torch.empty` (so on CPU untouched pages cost
nothing) and zero-filled lazily, per row, up to the longest length a step
containing that row reads:
positions past a row's length are masked out of attention, but they must hold
finite numbers, since 0 · NaN is still NaN.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch

ZERO_CHUNK = 256  # positions zeroed at a time, so zeroing is rare (not once per step)


class KVCache:
    def __init__(self, num_layers: int, max_batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (max_batch + 1, kv_heads, max_seq_len, head_dim)  # + the scratch row
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.scratch_row = max_batch
        self._free: list[int] = list(range(max_batch))
        heapq.heapify(self._free)
        self._zeroed = [0] * (max_batch + 1)  # per row: positions [0, _zeroed[row]) hold finite values

    @classmethod
    def for_model(cls, config, max_batch: int, max_seq_len: int, device: torch.device,
                  dtype: torch.dtype) -> "KVCache":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, max_batch, kv_heads, max_seq_len, head_dim, device, dtype)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, row: int) -> None:
        heapq.heappush(self._free, row)

    def ensure_initialized(self, rows: Iterable[int], length: int) -> None:
        """Zero each row's positions up to `length` (rounded up to ZERO_CHUNK) once.

        Call it for the step's rows with the step's largest end position BEFORE
        the step writes anything: positions at or past a row's watermark were
        then never written. Total work is bounded by the cache size, and on CPU
        only rows and lengths actually used ever get touched.
        """
        end = min(-(-length // ZERO_CHUNK) * ZERO_CHUNK, self.max_seq_len)
        runs: list[list[int]] = []  # [first row, last row + 1, start]: consecutive rows zeroed from one start
        for row in sorted(r for r in set(rows) if self._zeroed[r] < length):
            start = self._zeroed[row]
            if runs and runs[-1][1] == row and runs[-1][2] == start:
                runs[-1][1] = row + 1
            else:
                runs.append([row, row + 1, start])
            self._zeroed[row] = end
        for first, stop, start in runs:  # one op per run and tensor (a batch of new rows: one run)
            for t in (*self.k, *self.v):
                t[first:stop, :, start:end].zero_()

    def fork(self, src: int, dsts: list[int], length: int) -> None:
        """Copy positions [0, length) of row `src` into each of `dsts` (n sequences sharing one prefill)."""
        self.ensure_initialized(dsts, length)  # first: zeroing later must not wipe the copy
        index = torch.tensor(dsts, dtype=torch.long, device=self.k[0].device)
        for t in (*self.k, *self.v):
            t[index, :, :length] = t[src, :, :length].unsqueeze(0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

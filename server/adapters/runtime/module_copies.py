"""The device pool of whole-module copies (PEFT's `modules_to_save`), read per row in mixed batches.

Copies are big (SmolLM2's head: 49152×576, 113 MB in float32), so unlike the slot banks
(every device slot holds every adapted module's factors) they get a small pool of copy
rows of their own: one table `[rows, vocab, hidden]` in the model's dtype, its row count
set by the `module_copy_budget_mb` setting (`pool_rows`) and allocated at the first copy.
The input embedding and the head share the table (both weights are `[vocab, hidden]`), so a
tied copy (weights/saved_modules.py) takes one row for both modules. Which rows an adapter
holds is the residency manager's choice (its own LRU, residency/copy_rows.py); here each
module maps device slots to rows: `row_of[module]` `[slots + 2]` (−1: no copy; the last two
entries stand for BASE_SLOT and TRAIN_SLOT), indexed by the step's token slots the way
DoRA's table is (runtime/dora.py).

In a step, the rows of a slot with a copy take the copy's output instead of the base's:
  - embedding: one gather from the flattened table (row · vocab + id) for every token,
    then one `where` against the base output;
  - head: one matmul per distinct copy present (its rows are the plan's `rows(slot)`),
    never a loop over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.transfer import Stage
from server.adapters.weights.saved_modules import SavedModules


def pool_rows(budget_bytes: int, row_bytes: int, slots: int) -> int:
    """Copy rows the budget buys, at most two per device slot (an untied embedding and head each)."""
    return 0 if row_bytes <= 0 else max(0, min(budget_bytes // row_bytes, 2 * slots))


class ModuleCopyPool:
    def __init__(self, rows: int, shape: tuple[int, int], num_slots: int, device: torch.device,
                 dtype: torch.dtype, modules: Sequence[str]) -> None:
        self.rows = rows
        self.shape = shape  # (vocab, hidden): one copy's weight
        self.device, self.dtype = device, dtype
        self.table: torch.Tensor | None = None  # [rows, vocab, hidden], allocated with the first copy
        self.row_of = {name: torch.full((num_slots + 2,), -1, dtype=torch.long, device=device) for name in modules}
        self.held: dict[str, dict[int, int]] = {name: {} for name in modules}  # module -> device slot -> row

    @property
    def row_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def nbytes(self) -> int:
        return 0 if self.table is None else self.table.numel() * self.table.element_size()

    def allocate(self) -> None:
        """The table, before any write is issued (a copy stream must not allocate it)."""
        if self.table is None and self.rows:
            self.table = torch.empty((self.rows, *self.shape), device=self.device, dtype=self.dtype)

    def write(self, slot: int, rows: Sequence[int], saved: SavedModules, stage: Stage = lambda t: t) -> None:
        """Device slot `slot` reads `saved`'s copies from `rows` (one per distinct copy, in `distinct()` order)."""
        copies = saved.distinct()
        unknown = sorted(set(saved.weights) - set(self.held))
        if unknown or len(rows) != len(copies) or any(not 0 <= r < self.rows for r in rows):
            raise ValueError(f"module copies {saved.names()} into rows {list(rows)}: the pool has {self.rows} "
                             f"rows for {sorted(self.held)}")
        self.clear(slot)
        self.allocate()
        assert self.table is not None
        row_by_copy: dict[int, int] = {}
        for row, weight in zip(rows, copies):
            self.table[row].copy_(stage(weight))
            row_by_copy[id(weight)] = row
        for name, weight in saved.weights.items():
            self.held[name][slot] = row_by_copy[id(weight)]
            self.row_of[name][slot] = row_by_copy[id(weight)]

    def clear(self, slot: int) -> None:
        for name, held in self.held.items():
            if held.pop(slot, None) is not None:
                self.row_of[name][slot] = -1

    def active(self, name: str, batch: AdapterBatch) -> bool:
        """Whether a slot with a copy of `name` runs in this step (one set check when none is held)."""
        held = self.held.get(name)
        return bool(held) and batch.has_adapters and not batch.active.isdisjoint(held)

    def embed(self, name: str, ids: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Embedding output `y` `[..., hidden]` with the rows of copy-holding slots read from their copies."""
        assert self.table is not None
        vocab, hidden = self.shape
        y2 = y.reshape(-1, hidden)  # [tokens, hidden]
        _check_tokens(name, y2, batch)
        row = self.row_of[name][batch.mapping.token_slots]  # [tokens]: copy row, -1 = none
        flat = row.clamp(min=0) * vocab + ids.reshape(-1)  # [tokens] into [rows * vocab]
        picked = self.table.view(-1, hidden).index_select(0, flat)  # [tokens, hidden]
        return torch.where((row >= 0).unsqueeze(1), picked, y2).view(y.shape)

    def head(self, name: str, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Head output `y` `[..., vocab]` with each copy-holding slot's rows from its copy: one matmul per copy."""
        assert self.table is not None
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])  # [tokens, hidden], [tokens, vocab]
        _check_tokens(name, y2, batch)
        for slot, row in self.held[name].items():
            if slot in batch.active:
                rows = batch.rows(slot)  # [k]
                y2 = y2.index_copy(0, rows, F.linear(x2.index_select(0, rows), self.table[row]))
        return y2.view(y.shape)


def _check_tokens(name: str, y2: torch.Tensor, batch: AdapterBatch) -> None:
    if y2.shape[0] != batch.num_tokens:
        raise RuntimeError(f"{name}: forward has {y2.shape[0]} tokens but the AdapterMapping has {batch.num_tokens}")

"""Which resident adapter holds which rows of the module-copy pool (runtime/module_copies.py).

The pool is much smaller than the device slots (a copy is a whole vocab × hidden
matrix), so it keeps its own LRU: an adapter with whole-module copies is resident
only while both its slot and its copy rows are, and taking rows for a newcomer
evicts the least recently used adapters whose rows are not in use (the manager
evicts their slots with them). Bookkeeping only: no tensors here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container

from server.adapters.types import AdapterKey


class CopyRows:
    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._held: OrderedDict[AdapterKey, tuple[int, ...]] = OrderedDict()  # LRU order: oldest first

    def __contains__(self, key: AdapterKey) -> bool:
        return key in self._held

    def touch(self, key: AdapterKey) -> None:
        if key in self._held:
            self._held.move_to_end(key)

    def victims(self, count: int, evictable: Callable[[AdapterKey], bool],
                first: Container[AdapterKey] = ()) -> list[AdapterKey] | None:
        """The evictable holders to remove so that `count` rows are free, those in `first` (forgotten
        versions) before the others, each group least recently used first; None when that many cannot be
        freed now (the holders are in use) or ever (the pool is smaller)."""
        free = self.rows - self.used
        chosen: list[AdapterKey] = []
        order = sorted(self._held, key=lambda k: k not in first)  # stable: LRU order within each group
        for key in order:
            rows = self._held[key]
            if free >= count:
                break
            if evictable(key):
                chosen.append(key)
                free += len(rows)
        return chosen if free >= count else None

    def take(self, key: AdapterKey, count: int) -> tuple[int, ...]:
        """`count` free rows for `key` (after its victims were removed)."""
        taken = {r for rows in self._held.values() for r in rows}
        rows = tuple(r for r in range(self.rows) if r not in taken)[:count]
        if len(rows) < count:
            raise RuntimeError(f"{count} copy rows wanted, {len(rows)} free")
        self._held[key] = rows
        return rows

    def remove(self, key: AdapterKey) -> None:
        self._held.pop(key, None)

    @property
    def used(self) -> int:
        return sum(len(rows) for rows in self._held.values())

    def __len__(self) -> int:
        return len(self._held)

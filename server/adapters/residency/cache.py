"""The two cache tiers' bookkeeping: host LRU of loaded adapters, device slot table.

Neither tier touches tensors: `HostCache` holds LoadedAdapter objects (host
memory), `SlotTable` decides which key sits in which device slot; the manager
does the copy. Keys are versioned (AdapterKey), so a new upload is a new key
and a stale version can never be served for a newer one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Container

from server.adapters.weights.loaded import LoadedAdapter
from server.adapters.types import AdapterKey


class HostCache:
    """LRU of validated adapters in host memory; shared by the loader threads and the engine thread."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[AdapterKey, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, key: AdapterKey) -> LoadedAdapter | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: AdapterKey, adapter: LoadedAdapter) -> int:
        """Insert as most recent; returns how many entries were evicted to make room."""
        with self._lock:
            self._items[key] = adapter
            self._items.move_to_end(key)
            evicted = 0
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                evicted += 1
            self.evictions += evicted
            return evicted

    def drop(self, tenant: str, adapter_id: str) -> list[AdapterKey]:
        with self._lock:
            gone = [k for k in self._items if (k.tenant, k.adapter_id) == (tenant, adapter_id)]
            for k in gone:
                del self._items[k]
            return gone

    def __contains__(self, key: AdapterKey) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class SlotTable:
    """Which key occupies which device slot, pin counts, and LRU order of the resident keys."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_of: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order: oldest first
        self.pins: dict[AdapterKey, int] = {}
        self.doomed: set[AdapterKey] = set()  # forgotten: evict first, never hand out again

    def lookup(self, key: AdapterKey) -> int | None:
        slot = self.slot_of.get(key)
        if slot is not None:
            self.slot_of.move_to_end(key)
        return slot

    def pin(self, key: AdapterKey) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: AdapterKey) -> bool:
        """False if the key was not pinned (a release without an acquire)."""
        count = self.pins.get(key, 0)
        if count <= 0:
            return False
        if count == 1:
            del self.pins[key]
        else:
            self.pins[key] = count - 1
        return True

    def is_pinned(self, key: AdapterKey) -> bool:
        return self.pins.get(key, 0) > 0

    def free_slot(self) -> int | None:
        used = set(self.slot_of.values())
        return next((s for s in range(self.num_slots) if s not in used), None)

    def victim(self, busy: Container[AdapterKey] = ()) -> AdapterKey | None:
        """The doomed or least recently used unpinned resident key, if any, never one of `busy`
        (keys whose slot copy is still in flight)."""
        free = [k for k in self.slot_of if not self.is_pinned(k) and k not in busy]
        return next((k for k in free if k in self.doomed), None) or next(iter(free), None)

    def assign(self, key: AdapterKey, slot: int) -> None:
        self.slot_of[key] = slot
        self.slot_of.move_to_end(key)

    def remove(self, key: AdapterKey) -> int:
        self.doomed.discard(key)
        return self.slot_of.pop(key)

    @property
    def pinned_count(self) -> int:
        return len(self.pins)

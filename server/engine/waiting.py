"""The waiting queue: requests accepted but not yet admitted to the batch, in arrival order.

It is its own object, built before the engine, because two sides read it: the
engine's scheduler admits from it, and the adapter service asks it which adapter
versions queued requests wait for (their files must outlive them). The training
worker the engine is built with publishes through that service, so the queue
cannot be the engine's own part without a construction cycle.

Thread-safety: every method may be called from any thread.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from server.engine.request import Request
from server.errors import QueueFull


class WaitingQueue:
    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._requests: deque[Request] = deque()
        self._lock = threading.Lock()

    def push(self, request: Request) -> None:
        """Queue `request`; QueueFull (429) once `max_queue` requests wait."""
        with self._lock:
            if len(self._requests) >= self.max_queue:
                raise QueueFull()
            self._requests.append(request)

    def __len__(self) -> int:
        return len(self._requests)

    def is_queued(self, adapter_key: Any) -> bool:
        """Whether a waiting request holds this adapter version: it has no device pin yet, but the version's
        files must outlive it (the store's garbage collector asks, beside the manager's pins)."""
        with self._lock:
            return any(r.adapter_key == adapter_key for r in self._requests)

    def count(self, tenant: str) -> int:
        """Requests of `tenant` waiting (its `max_queued` limit)."""
        with self._lock:
            return sum(1 for r in self._requests if r.tenant == tenant)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def discard(self, request: Request) -> bool:
        """Remove `request` if it still waits; False when it was admitted or removed already."""
        with self._lock:
            try:
                self._requests.remove(request)
            except ValueError:
                return False
            return True

    def take_cancelled(self) -> list[Request]:
        """Remove and return the cancelled requests."""
        with self._lock:
            cancelled = [r for r in self._requests if r.cancelled]
            if cancelled:
                self._requests = deque(r for r in self._requests if not r.cancelled)
            return cancelled

    def drain(self) -> list[Request]:
        with self._lock:
            out = list(self._requests)
            self._requests.clear()
        return out

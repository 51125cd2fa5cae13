"""Turns for the background worker (the trainer) between serving steps.

Why interleave rather than a thread of its own: the worker runs forwards and backwards through the same
adapter-aware layers as serving, which only the engine thread may touch. While requests are served it gets
one step every `every` serving steps; when the engine is idle, every pass.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class BackgroundWorker(Protocol):
    def has_work(self) -> bool: ...
    def run_one_step(self) -> None: ...


class BackgroundTurns:
    def __init__(self, worker: BackgroundWorker | None, every: int) -> None:
        self.worker = worker
        self.every = every
        self._since = 0  # serving steps since the worker's last turn
        self.steps = 0

    def take(self, busy: bool) -> bool:
        """Engine thread, after a scheduling pass (`busy`: it ran a serving step): run one worker step if it
        is the worker's turn and it has work. A worker's failure is its own; serving goes on."""
        if self.worker is None:
            return False
        if busy:
            self._since += 1
            if self._since < self.every:
                return False
        try:
            if not self.worker.has_work():
                return False
            self._since = 0
            self.worker.run_one_step()
        except Exception:  # noqa: BLE001 - the worker owns its errors; serving goes on
            log.exception("background worker step failed")
        self.steps += 1
        return True

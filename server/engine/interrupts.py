"""Abandoning the step in flight for a newcomer that will preempt, so its first token waits for no decode step.

A step stops only between layers and before its results are used (attention.StepInterrupted): the KV it
wrote sits at positions no attention reads before they are written again, so its sequences simply run in a
later step. Never two interrupted steps in a row: arrivals cannot starve the batch.
"""

from __future__ import annotations

import threading


class StepInterrupts:
    def __init__(self, enabled: bool) -> None:
        self._event = threading.Event() if enabled else None
        self._last_interrupted = False
        self.count = 0  # steps abandoned

    def request(self) -> None:
        """Any thread: abandon the step in flight at its next layer (if it may be)."""
        if self._event is not None:
            self._event.set()

    def arm(self) -> threading.Event | None:
        """Engine thread, before a scheduling pass: the event the next step watches (None: it runs to the end).
        Cleared here, so requests queued before the pass never interrupt the step it plans."""
        if self._event is None:
            return None
        self._event.clear()
        return None if self._last_interrupted else self._event

    def interrupted(self) -> None:
        self.count += 1
        self._last_interrupted = True

    def completed(self) -> None:
        self._last_interrupted = False

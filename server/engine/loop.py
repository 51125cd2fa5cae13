"""The engine thread's wake-up and between-steps hooks, as an object of its own.

It exists before the engine, so a component the engine depends on (the merge
registry, behind the adapter manager) can be given it at construction instead
of being handed the engine afterwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self) -> None:
        self.woken = threading.Event()
        self.alive = False  # True while an engine thread runs this loop
        self._hooks: list[Callable[[], None]] = []
        self._lanes: frozenset[int | None] = frozenset()

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Run `hook` on the engine thread before every scheduling pass, never during a step.

        Why: model state that a step reads (e.g. merged weights) may only change
        between steps; a hook is that point. Hooks must be cheap when idle.
        """
        self._hooks.append(hook)
        self.woken.set()

    def wake(self) -> None:
        self.woken.set()

    def lanes_in_use(self) -> frozenset[int | None]:
        """Lanes of the running sequences, as of the hooks now running (engine thread)."""
        return self._lanes

    def run_hooks(self, lanes_in_use: Iterable[int | None]) -> None:
        self._lanes = frozenset(lanes_in_use)
        for hook in self._hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook's owner reports its errors; serving goes on
                log.exception("engine step hook %r failed", hook)

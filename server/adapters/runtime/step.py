"""StepContext: everything one forward of the model reads besides its inputs.

Built whole before the forward by whoever runs it (the engine's runner; the
trainer; a test) and set for the forward's duration with `use_step(...)`; the
adapter layers read `.adapters`, the engine's attention reads `.attention`.
One object, one thread-local: nothing in it is built or cached by the layers.

It lives beside the adapter layers because they are the lowest code that reads
it; the attention metadata is the engine's own type (the engine sits above the
adapters), hence the type parameter.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch

AttentionT = TypeVar("AttentionT")


@dataclass(frozen=True)
class StepContext(Generic[AttentionT]):
    adapters: AdapterBatch | None = None  # None: no adapter math (the base modules alone)
    attention: AttentionT | None = None  # None: an ordinary forward (transformers' own attention)


_state = threading.local()


def current_step() -> StepContext[Any] | None:
    return getattr(_state, "step", None)


@contextlib.contextmanager
def use_step(step: StepContext[Any] | None) -> Iterator[None]:
    previous = current_step()
    _state.step = step
    try:
        yield
    finally:
        _state.step = previous


def adapter_step(mapping: AdapterMapping) -> contextlib.AbstractContextManager[None]:
    """A step of adapter math only (no engine attention): the trainer's and the tests' forwards."""
    return use_step(StepContext(adapters=AdapterBatch.build(mapping)))

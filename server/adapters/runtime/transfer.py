"""How an adapter's factors travel from host memory into device slots.

On a GPU a device-tier miss must not stall the running streams: the engine thread
issues the slot writes on a side CUDA stream (asynchronous copies from the pinned
host arena) and gets a `Fence`; the slot is handed to a request only once the
fence is done, and the compute stream waits on it before the first step that
reads the slot. On CPU (or any device without streams) the writes run inline and
the fence is done at once, so the same code path runs everywhere.

The orderings a `StreamCopier` keeps (every call on the engine thread, between steps):
  - writes begin after the compute work enqueued so far (the copy stream waits on
    the compute stream): a slot just evicted may still be read by a step in flight,
    and memory freed by a write is reused only after the work that read it;
  - a bank growing (new, larger tensors, then a copy of the old ones) waits for
    every write issued so far (`join`): the old tensors may still be being written;
  - the compute stream waits on a write's fence before any step uses its slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

Stage = Callable[[torch.Tensor], torch.Tensor]  # host tensor -> the same values, readable on the slots' device


class Fence(Protocol):
    def done(self) -> bool:
        """Whether the writes behind this fence have completed (never blocks)."""
        ...

    def order_before_compute(self) -> None:
        """Make the compute stream's next work wait for these writes (asynchronous)."""
        ...


class SlotCopier(Protocol):
    def writes(self) -> contextlib.AbstractContextManager[Stage]:
        """The context slot writes are issued in; yields `stage` for their host sources."""
        ...

    def fence(self) -> Fence:
        """A fence after every write issued so far."""
        ...

    def join(self) -> None:
        """The compute stream waits for every write issued so far (before a bank's tensors are replaced)."""
        ...


class _Done:
    def done(self) -> bool:
        return True

    def order_before_compute(self) -> None:
        pass


DONE: Fence = _Done()


class InlineCopier:
    """CPU: writes copy synchronously from the host tensors themselves; every fence is already done."""

    @contextlib.contextmanager
    def writes(self) -> Iterator[Stage]:
        yield _identity

    def fence(self) -> Fence:
        return DONE

    def join(self) -> None:
        pass


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class _EventFence:
    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event, self.device = event, device

    def done(self) -> bool:
        return bool(self.event.query())

    def order_before_compute(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


class StreamCopier:
    """CUDA: writes on a side stream. Each host storage a write reads (an adapter's whole pinned arena)
    is uploaded once per `writes()` block, asynchronously, and the slots copy from device views of it,
    so a ~420-tensor adapter costs one host→device transfer and device-side copies, none blocking."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def writes(self) -> Iterator[Stage]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        uploads: dict[int, torch.Tensor] = {}  # host storage address -> its bytes on the device

        def stage(t: torch.Tensor) -> torch.Tensor:
            if t.device.type != "cpu":
                return t
            key = t.untyped_storage().data_ptr()
            if key not in uploads:
                uploads[key] = storage_bytes(t).to(self.device, non_blocking=True)
            return view_in(uploads[key], t)

        with torch.cuda.stream(self.stream):
            yield stage

    def fence(self) -> Fence:
        return _EventFence(self.stream.record_event(), self.device)

    def join(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under `t` (an adapter's arena), as `[nbytes]` uint8 sharing its memory."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def view_in(whole: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t`'s view into `whole`, a copy of `storage_bytes(t)` (on another device)."""
    return whole.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())


def copier_for(device: torch.device) -> SlotCopier:
    return StreamCopier(device) if device.type == "cuda" else InlineCopier()

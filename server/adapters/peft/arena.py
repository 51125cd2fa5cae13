"""Arena: one owned flat buffer per adapter in host memory, carved into its tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import threading

import torch

_PAGE = 4096
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and pages fault in one by one
PREFAULT_MIN_BYTES = 1 << 20  # below this the page faults cost less than the call
PREFAULT_CHUNK_BYTES = 4 << 20  # other threads' allocations wait at most one chunk's faults


class Arena:
    """One owned flat buffer an adapter's compute-form tensors are carved from, in order.

    Why: hundreds of small tensors per adapter fragment the host heap (freed
    adapters leave holes a new one does not exactly fit, so RSS outgrows the
    tensor bytes); one allocation per adapter is freed whole, and one pass over
    `flat` checks every value. Loaders write straight into `take(...)` views, so
    no intermediate copy of the adapter exists. The buffer is the pre-faulted
    spare when one of this exact size is ready (SpareBuffer).

    `pin` (slots on a GPU): page-locked memory from torch's pinned-memory allocator, so copies
    into device slots run asynchronously on a copy stream (runtime/transfer.py); that allocator
    caches freed blocks (rounded up to a power of two) for the next adapter's arena.
    """

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool = False) -> None:
        self.flat = torch.empty(numel, dtype=dtype, pin_memory=True) if pin else _spare.take(numel, dtype)  # [numel]
        self._used = 0

    def take(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if self._used + n > self.flat.numel():
            raise ValueError(f"arena of {self.flat.numel()} elements is full")
        view = self.flat[self._used:self._used + n].view(shape)
        self._used += n
        return view


class SpareBuffer:
    """One buffer of the size the last arena asked for, allocated and faulted in ahead of need.

    Why: a cold adapter's first request waits for its load, and writing fresh memory the host has
    not backed yet can be most of that load (bench/NOTES.md, "Adapter loads"): the time depends on
    the machine's memory history, not on the adapter. Adapters of one deployment mostly share a size,
    so the next one's memory is made ready in the background after each take; a size that does
    not match gets fresh memory as before, and the spare follows the new size. Costs one
    adapter's bytes of idle memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._buffer: torch.Tensor | None = None
        self._want: tuple[int, torch.dtype] | None = None
        self._thread: threading.Thread | None = None
        self.hits = self.misses = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A `[numel]` buffer (contents undefined): the spare when it fits exactly, else a fresh one.
        Small buffers (a single module's, in tests and tools) bypass the spare and leave it as it is."""
        if numel * dtype.itemsize < PREFAULT_MIN_BYTES:
            return torch.empty(numel, dtype=dtype)
        with self._lock:
            buf, self._buffer = self._buffer, None
            if buf is None or buf.numel() != numel or buf.dtype != dtype:
                buf = None
            self._want = (numel, dtype) if numel * dtype.itemsize <= SPARE_MAX_BYTES else None
            if self._want is not None:
                self._start()
                self._wake.set()
            if buf is not None:
                self.hits += 1
                return buf
            self.misses += 1
        fresh = torch.empty(numel, dtype=dtype)
        prefault(fresh)
        return fresh

    def ready(self) -> tuple[int, torch.dtype] | None:
        """(numel, dtype) of the spare waiting to be taken, if any."""
        with self._lock:
            return None if self._buffer is None else (self._buffer.numel(), self._buffer.dtype)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refill_forever, name="arena-spare", daemon=True)
            self._thread.start()

    def _refill_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                want, have = self._want, self._buffer
            if want is None or (have is not None and (have.numel(), have.dtype) == want):
                continue
            buf = torch.empty(want[0], dtype=want[1])
            if not prefault(buf):
                buf.view(torch.uint8)[::_PAGE].zero_()  # one write per page maps it
            with self._lock:
                if self._want == want:
                    self._buffer = buf


SPARE_MAX_BYTES = 512 << 20  # larger adapters are rare enough to pay their own page faults
_spare = SpareBuffer()


def prefault(t: torch.Tensor) -> bool:
    """Map a fresh CPU buffer's pages in one system call, before the loader writes it.

    Why: a new arena is fresh memory, and writing it page by page takes one page fault per
    4 KiB (bench/NOTES.md, "Adapter loads"); the read sits on a cold request's first token.
    Best effort: False (nothing done) off Linux, on kernels without MADV_POPULATE_WRITE, or
    for small buffers."""
    nbytes = t.numel() * t.element_size()
    madvise = _madvise()
    if madvise is None or not t.is_cpu or nbytes < PREFAULT_MIN_BYTES:
        return False
    start = -(-t.data_ptr() // _PAGE) * _PAGE  # whole pages inside the buffer only
    end = (t.data_ptr() + nbytes) // _PAGE * _PAGE
    for chunk in range(start, end, PREFAULT_CHUNK_BYTES):  # chunks: the call holds the process's mmap lock
        size = min(PREFAULT_CHUNK_BYTES, end - chunk)
        if madvise(ctypes.c_void_p(chunk), ctypes.c_size_t(size), _MADV_POPULATE_WRITE) != 0:
            return False
    return end > start


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn

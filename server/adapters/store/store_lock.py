"""One server per store: an exclusive `flock` on `ROOT/.lock`, which holds the owner's pid.

Why: two servers on one store sweep each other's in-flight uploads at start-up
and re-claim each other's training jobs. Sharing a store is not a supported
mode, so the second server refuses to start, naming the holder. The kernel
drops an flock when its process dies (kill -9 included), so a lock is never
stale: the pid in the file is only what the message shows.

Within one process the lock is shared and counted: the CLI takes it before the
model loads (to refuse fast, with one line) and the app's store takes it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lock"

_held: dict[str, list[int]] = {}  # resolved root -> [fd, holders in this process]
_guard = threading.Lock()


class StoreInUse(RuntimeError):
    """Another process serves this store; the message names it."""


def acquire_store_lock(root: Path) -> Callable[[], None]:
    """Hold the store's lock (StoreInUse if another process does); returns the idempotent release."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    with _guard:
        held = _held.get(key)
        if held is None:
            held = _held[key] = [_lock_file(root / LOCK_NAME), 0]
        held[1] += 1
    released = False

    def release() -> None:
        nonlocal released
        with _guard:
            if released:
                return
            released = True
            held[1] -= 1
            if held[1] == 0:
                del _held[key]
                os.close(held[0])  # closing the last descriptor drops the flock

    return release


def _lock_file(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise StoreInUse(f"the store {path.parent} is in use by another loraplex server (pid {holder}); "
                         "stop it or pass another --store") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"

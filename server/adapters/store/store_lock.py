"""One server (or one cluster) per store: an `flock` on `ROOT/.lock`.

Why: two independent servers on one store sweep each other's in-flight uploads
at start-up and re-claim each other's training jobs, so a single server takes
the lock exclusively (writing its pid, which the refusal names). The replicas
of one cluster take it shared: they never sweep (the cluster's driver swept
once, alone, before starting them), publish under a per-adapter file lock
(`adapter_lock`) and claim jobs under leases (server/training/leases.py). An
exclusive and a shared holder exclude each other. The kernel drops an flock
when its process dies (kill -9 included), so a lock is never stale.

Within one process the lock is counted per mode: the CLI takes it before the
model loads (to refuse fast, with one line) and the app's store takes it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_NAME = ".lock"
ADAPTER_LOCKS_DIR = ".locks"
ADAPTER_LOCK_STRIPES = 64

_held: dict[tuple[str, bool], list[int]] = {}  # (resolved root, shared) -> [fd, holders in this process]
_guard = threading.Lock()
_thread_locks: dict[Path, threading.Lock] = {}
_stripes_held = threading.local()  # .paths: the stripes this thread holds


class StoreInUse(RuntimeError):
    """Another process serves this store; the message names it."""


def acquire_store_lock(root: Path, shared: bool = False) -> Callable[[], None]:
    """Hold the store's lock (StoreInUse if another process holds it in the other mode, or exclusively);
    returns the idempotent release. `shared`: one replica of a cluster."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = (str(root.resolve()), shared)
    with _guard:
        held = _held.get(key)
        if held is None:
            held = _held[key] = [_lock_file(root / LOCK_NAME, shared), 0]
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


def _lock_file(path: Path, shared: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise StoreInUse(f"the store {path.parent} is in use by another loraplex server or cluster "
                         f"(pid {holder}); stop it or pass another --store") from None
    if not shared:  # shared holders leave the file alone: the exclusive holder's pid is what refusals name
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def adapter_lock(root: Path, tenant: str, adapter_id: str) -> Iterator[None]:
    """Serialise publishes and deletes of one adapter across the threads *and* processes on a store, so
    two replicas never number two uploads the same version. The lock files are a fixed set of stripes
    (`ROOT/.locks/00..3f`, by a hash of tenant and id): no file names a tenant or an adapter, none is
    left behind by a delete, and their count is bounded. Re-entrant per thread (two ids may share a stripe)."""
    digest = hashlib.sha256(f"{tenant}\0{adapter_id}".encode()).digest()
    path = Path(root).resolve() / ADAPTER_LOCKS_DIR / f"{digest[0] % ADAPTER_LOCK_STRIPES:02x}"
    held = _stripes_held.__dict__.setdefault("paths", set())
    if path in held:  # this thread holds the stripe already (another id on it): the flock is ours
        yield
        return
    with _guard:
        thread_lock = _thread_locks.setdefault(path, threading.Lock())
    with thread_lock:
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        held.add(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another replica's publish takes milliseconds: wait for it
            yield
        finally:
            held.discard(path)
            os.close(fd)  # drops the flock


def create_adapter_lock_stripes(root: Path) -> None:
    """All stripes at once when a store opens, so a store's files do not change as adapters come and go."""
    locks = Path(root) / ADAPTER_LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    for i in range(ADAPTER_LOCK_STRIPES):
        (locks / f"{i:02x}").touch(exist_ok=True)


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"

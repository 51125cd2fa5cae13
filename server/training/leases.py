"""Which process runs a job: each trainer holds an `flock` on `<store>/.training/workers/<id>` for life.

Why: the replicas of a cluster share one job queue (the SQLite file is safe
across processes), and a replica starting up must requeue the jobs a *dead*
process left `running`, never those another live replica is running now. A
claimed job's row names its owner; the kernel drops the owner's flock when the
process dies (kill -9 included), so "the lock can be taken" means "the owner is
gone", with no clock or heartbeat to tune.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path


class WorkerLease:
    """This process's owner id, held (locked) until `close`."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.owner = uuid.uuid4().hex
        self._fd: int | None = os.open(root / self.owner, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # a fresh name: nobody else can hold it

    def owner_alive(self, owner: str | None) -> bool:
        """Whether the process that claimed a job under `owner` still lives (None: a row from before
        owners were recorded, whose process is gone)."""
        if owner is None or not owner.isalnum():
            return False
        if owner == self.owner:
            return True
        path = self.root / owner
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()  # a dead owner's file: nobody will ask about it again once its jobs are requeued
        return False

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                (self.root / self.owner).unlink()
            os.close(fd)

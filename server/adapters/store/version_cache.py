"""This server's local disk copy of versions downloaded from a shared bucket, bounded in bytes.

Layout under ROOT (one per bucket + prefix + endpoint):

    ROOT/<tenant>/<adapter_id>/v000003-<digest>/{adapter_config.json, adapter_model.safetensors, ...}
    ROOT/.tmp/<uuid>/                               # downloads and uploads being written

Why: the engine's loader reads a directory, and a version is immutable, so a
verified download serves every later load of that version without the
network. An entry appears only by one rename of a fully written, verified
directory; its name carries the files' digests, so an entry can never stand in
for other bytes under the same version number (a bucket emptied and refilled).
Entries are evicted least recently used once the total passes `max_bytes`,
but never one used within `min_age_s`: a request that resolved it may not have
read its files yet (so the bound can be exceeded for that long under a burst).
Several servers on one machine may share ROOT: every step is a rename or an
idempotent removal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.adapters.store.fsutil import fsync_dir, fsync_tree, scratch_dir
from server.adapters.types import AdapterKey

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
STALE_TMP_S = 3600.0  # a staging dir this old belongs to no live upload (one body read is capped far below)


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int
    used_at: float


class VersionCache:
    def __init__(self, root: Path, max_bytes: int, min_age_s: float = 60.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.min_age_s = min_age_s
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def path(self, key: AdapterKey, digest: str) -> Path:
        return self.root / key.tenant / key.adapter_id / f"v{key.version:06d}-{digest}"

    def hit(self, path: Path) -> bool:
        """True when the entry is here; marks it used now (eviction order)."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A fresh dir on the cache's filesystem (installing is one rename); gone on exit unless installed."""
        with scratch_dir(self.root / TMP_DIR) as path:
            yield path

    def install(self, scratch: Path, path: Path) -> None:
        """Move a complete, verified dir into place (another process may have won: its copy is the same bytes)."""
        fsync_tree(scratch)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(scratch, path)
        except OSError:
            if not path.is_dir():
                raise
            return
        fsync_dir(path.parent)
        os.utime(path)
        self.evict(keep=path)

    def drop(self, key: AdapterKey) -> None:
        """Remove every entry of one version (superseded or deleted, and no request of ours holds it)."""
        adir = self.root / key.tenant / key.adapter_id
        for entry in adir.glob(f"v{key.version:06d}-*"):
            self._remove(entry)

    def versions(self, tenant: str, adapter_id: str) -> set[int]:
        adir = self.root / tenant / adapter_id
        return {int(p.name[1:7]) for p in adir.glob("v*-*") if p.name[1:7].isdigit()}

    def entries(self) -> list[CacheEntry]:
        found = []
        for path in self.root.glob("*/*/v*-*"):
            with contextlib.suppress(FileNotFoundError):
                size = sum(f.stat().st_size for f in path.iterdir())
                found.append(CacheEntry(path, size, path.stat().st_mtime))
        return found

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the total fits `max_bytes`; returns bytes freed."""
        entries = sorted(self.entries(), key=lambda e: e.used_at)
        total = sum(e.size for e in entries)
        freed = 0
        now = time.time()
        for entry in entries:
            if total - freed <= self.max_bytes:
                break
            if entry.path == keep or now - entry.used_at < self.min_age_s:
                continue
            self._remove(entry.path)
            freed += entry.size
        if freed:
            log.info("adapter cache: evicted %d bytes (%d bytes kept, bound %d)", freed, total - freed,
                     self.max_bytes)
        return freed

    def sweep(self) -> None:
        """Start-up: staging dirs left by a crash (old ones only: another server may share this cache)."""
        now = time.time()
        for entry in list((self.root / TMP_DIR).iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(entry, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        """Rename out of sight first: a reader never sees a half-removed entry under its real name."""
        doomed = self.root / TMP_DIR / f"evict-{uuid.uuid4().hex}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

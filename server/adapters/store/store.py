"""The durable adapter store: the source of truth for which adapters exist.

Layout under `--store` (ROOT):

    ROOT/<tenant>/<adapter_id>/v000001/{adapter_config.json, adapter_model.safetensors, loraplex_record.json}
    ROOT/<tenant>/<adapter_id>/v000002/...          # a re-upload: a new, immutable version
    ROOT/<tenant>/<adapter_id>/adapter_config.json  # "loose" files placed by hand (+ the safetensors)
    ROOT/<tenant>/<adapter_id>/.deleted_through     # highest version ever deleted (keeps versions monotonic)
    ROOT/.tmp/<uuid>/                               # uploads being written (swept at start-up)
    ROOT/.trash/<tenant>+<id>+v<N>+<uuid>/          # versions waiting for their last request to finish

Precedence: the highest version wins. Loose files (an adapter copied in by
hand, as the shipped examples are) count as version `deleted_through + 1`
(i.e. 1 for a fresh adapter); a `vNNNNNN` directory with the same number takes
precedence over them, and any upload creates a higher version. Versions at or
below `.deleted_through` are never served.

Why this shape: a version directory appears only through one atomic rename of a
fully written, fsynced staging directory, so a crash can never leave a half
adapter that resolves; a delete commits by writing `.deleted_through` (after
moving loose files away), so a crash mid-delete cannot resurrect it; and
versions only ever grow, so an `AdapterKey` names one set of weights forever
(no cache can serve stale weights under a reused key).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapters.store.fsutil import file_digest, fsync_dir, fsync_tree, scratch_dir, write_json_atomic
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_config import summary_from_config
from server.adapters.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from server.adapters.store.store_lock import acquire_store_lock, adapter_lock, create_adapter_lock_stripes
from server.adapters.ids import TENANT_RE, InvalidName, check_adapter_id, check_tenant, is_valid_name
from server.adapters.types import AdapterKey, AdapterRef
from server.errors import ClientGone, InvalidRequest, NotFound

log = logging.getLogger(__name__)

RECORD_NAME = "loraplex_record.json"
DELETED_NAME = ".deleted_through"
TMP_DIR = ".tmp"
TRASH_DIR = ".trash"
VERSION_RE = re.compile(r"^v(\d{6,})$")
MARKER_RE = re.compile(r"^\.[a-z]{1,32}$")

_LOCKS_GUARD = threading.Lock()

# Summarises one adapter directory as {type, variant, rank, target_modules};
# set by the app to the engine's own validator (peft_format.read_adapter).
Describer = Callable[[Path], dict[str, Any]]


@contextlib.contextmanager
def names_as_422() -> Iterator[None]:
    """The naming rule's refusal as the store's callers expect it: a 422 (ids is a leaf, its error a ValueError)."""
    try:
        yield
    except InvalidName as e:
        raise InvalidRequest(str(e)) from None


def check_marker(name: str) -> str:
    """A marker is a short dot name: never a version, a pointer or a path."""
    if not MARKER_RE.fullmatch(name):
        raise ValueError(f"not a marker name: {name!r}")
    return name


def not_found(adapter_id: str) -> NotFound:
    """The same message whether the id is unknown or another tenant's: existence is not leaked."""
    return NotFound(f"adapter {adapter_id!r} not found")


@dataclass(frozen=True)
class StoredVersion:
    """One resolvable version plus its stored record fields (no mode/resident: those are live state)."""

    ref: AdapterRef
    record: dict[str, Any]


class AdapterStore:
    def __init__(self, root: Path, describe: Describer | None = None, shared_grace_s: float | None = None) -> None:
        """`shared_grace_s`: set when other processes (cluster replicas) serve this store too; no
        replica sees the others' pins, so files of a superseded or deleted version stay at least
        this long after it stopped being the newest (see `_settled`)."""
        self.root = Path(root)
        self.describe = describe
        self.shared_grace_s = shared_grace_s
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TMP_DIR).mkdir(exist_ok=True)
        (self.root / TRASH_DIR).mkdir(exist_ok=True)
        create_adapter_lock_stripes(self.root)
        self._described: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._gc_timer: threading.Timer | None = None
        self._release_lock: Callable[[], None] = lambda: None

    def close(self) -> None:
        """Release the store's process lock (taken by `open_store`), so another server may open it."""
        self._release_lock()

    # ------------------------------------------------------------------ paths
    def adapter_dir(self, tenant: str, adapter_id: str) -> Path:
        with names_as_422():
            return self.root / check_tenant(tenant) / check_adapter_id(adapter_id)

    def lock(self, tenant: str, adapter_id: str) -> contextlib.AbstractContextManager[None]:
        """One lock per (store root, tenant, id), across threads and processes (cluster replicas):
        publishes and deletes of one adapter are serialised."""
        return adapter_lock(self.root, tenant, adapter_id)

    # --------------------------------------------------------------- reading
    def _deleted_through(self, adir: Path) -> int:
        try:
            return int((adir / DELETED_NAME).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _versions(self, adir: Path) -> dict[int, Path]:
        """Every live version of one adapter dir: {version: dir holding the two files}."""
        if not adir.is_dir():
            return {}
        floor = self._deleted_through(adir)
        found: dict[int, Path] = {}
        if (adir / CONFIG_NAME).is_file() and (adir / WEIGHTS_NAME).is_file():
            found[floor + 1] = adir
        for child in adir.iterdir():
            m = VERSION_RE.fullmatch(child.name)
            if m and int(m.group(1)) > floor and (child / CONFIG_NAME).is_file():
                found[int(m.group(1))] = child
        return found

    def resolve(self, tenant: str, adapter_id: str) -> AdapterRef:
        """The newest live version; NotFound (no tenant leak) if there is none."""
        with names_as_422():
            check_adapter_id(adapter_id)
        versions = self._versions(self.adapter_dir(tenant, adapter_id))
        if not versions:
            raise not_found(adapter_id)
        version = max(versions)
        return AdapterRef(AdapterKey(tenant, adapter_id, version), versions[version])

    def exists(self, tenant: str, adapter_id: str) -> bool:
        try:
            self.resolve(tenant, adapter_id)
        except NotFound:
            return False
        return True

    def tenants(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TENANT_RE.fullmatch(p.name))

    def adapter_ids(self, tenant: str) -> list[str]:
        with names_as_422():
            tdir = self.root / check_tenant(tenant)
        if not tdir.is_dir():
            return []
        ids = []
        for child in sorted(tdir.iterdir()):
            if is_valid_name(child.name) and self._versions(child):
                ids.append(child.name)
        return ids

    def get(self, tenant: str, adapter_id: str) -> StoredVersion:
        ref = self.resolve(tenant, adapter_id)
        return StoredVersion(ref, self._record(ref))

    def list(self, tenant: str | None = None) -> list[StoredVersion]:
        """Every live adapter of one tenant (None: all tenants, for admins)."""
        return [StoredVersion(ref, self._record(ref)) for ref in self._live(tenant)]

    def newest_first(self) -> list[AdapterRef]:
        """Every tenant's live versions, most recently written first (what a warm-up loads first)."""
        return sorted(self._live(), key=lambda ref: _mtime(ref.path), reverse=True)

    def _live(self, tenant: str | None = None) -> Iterator[AdapterRef]:
        """The newest live version of each adapter (of one tenant, or all); ids deleted meanwhile are skipped."""
        for t in [tenant] if tenant is not None else self.tenants():
            for adapter_id in self.adapter_ids(t):
                try:
                    ref = self.resolve(t, adapter_id)
                except NotFound:
                    continue
                yield ref

    def _record(self, ref: AdapterRef) -> dict[str, Any]:
        """Stored fields of a version; loose/foreign dirs are summarised once and cached."""
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads((ref.path / RECORD_NAME).read_text())
            return {**rec, "id": ref.key.adapter_id, "tenant": ref.key.tenant, "version": ref.key.version}
        weights = ref.path / WEIGHTS_NAME
        st = weights.stat()
        cache_key = (str(weights), st.st_mtime_ns, st.st_size)
        if cache_key not in self._described:
            sha, size = file_digest(weights)
            self._described[cache_key] = {**self._summary(ref.path), "size_bytes": size, "sha256": sha,
                                          "created_at": _iso(st.st_mtime)}
        return {"id": ref.key.adapter_id, "tenant": ref.key.tenant, **self._described[cache_key],
                "version": ref.key.version}

    def _summary(self, path: Path) -> dict[str, Any]:
        if self.describe is not None:
            with contextlib.suppress(Exception):
                return self.describe(path)
        return summary_from_config(path / CONFIG_NAME)

    def has_marker(self, tenant: str, adapter_id: str, name: str) -> bool:
        return (self.adapter_dir(tenant, adapter_id) / check_marker(name)).is_file()

    def set_marker(self, tenant: str, adapter_id: str, name: str, present: bool) -> None:
        """A marker lives in the adapter's directory, so only an adapter that exists gets one."""
        path = self.adapter_dir(tenant, adapter_id) / check_marker(name)
        if present and path.parent.is_dir():
            path.touch()
        elif not present:
            path.unlink(missing_ok=True)

    # --------------------------------------------------------------- writing
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh dir inside the store (same filesystem: publish is one rename); gone on exit unless published."""
        with scratch_dir(self.root / TMP_DIR) as path:
            yield path

    def publish(self, tenant: str, adapter_id: str, staged: Path, summary: dict[str, Any],
                abandoned: Callable[[], bool] = lambda: False) -> StoredVersion:
        """Make a fully validated staging dir the newest version, atomically.

        `summary` holds {type, variant, rank, target_modules}; size and sha256
        are computed here from the bytes that are actually published. An upload whose client left
        (`abandoned()`, asked under the lock just before the rename) is never published (ClientGone).
        """
        adir = self.adapter_dir(tenant, adapter_id)
        if not (staged / CONFIG_NAME).is_file() or not (staged / WEIGHTS_NAME).is_file():
            raise InvalidRequest(f"an adapter needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        sha, size = file_digest(staged / WEIGHTS_NAME)
        with self.lock(tenant, adapter_id):
            if abandoned():
                raise ClientGone("the client disconnected before the upload was published; nothing was stored")
            adir.mkdir(parents=True, exist_ok=True)
            fsync_dir(adir.parent)
            version = max([self._deleted_through(adir), *self._versions(adir)], default=0) + 1
            record = {"id": adapter_id, "tenant": tenant, **summary, "size_bytes": size, "sha256": sha,
                      "version": version, "created_at": _iso(time.time())}
            (staged / RECORD_NAME).write_text(json.dumps(record))
            fsync_tree(staged)
            target = adir / f"v{version:06d}"
            os.rename(staged, target)
            fsync_dir(adir)
        log.info("published adapter %s/%s v%d (%d bytes)", tenant, adapter_id, version, size)
        return StoredVersion(AdapterRef(AdapterKey(tenant, adapter_id, version), target), record)

    def add_from_dir(self, tenant: str, adapter_id: str, src: Path, summary: dict[str, Any]) -> StoredVersion:
        """Copy a finished adapter dir (e.g. a training job's output) in as a new version."""
        with self.staging() as staged:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copyfile(Path(src) / name, staged / name)
            return self.publish(tenant, adapter_id, staged, summary)

    def delete(self, tenant: str, adapter_id: str) -> list[AdapterKey]:
        """Stop serving every version now; files go to the trash until no request holds them."""
        adir = self.adapter_dir(tenant, adapter_id)
        with self.lock(tenant, adapter_id):
            versions = self._versions(adir)
            if not versions:
                raise not_found(adapter_id)
            floor = self._deleted_through(adir)
            if adir in versions.values():  # loose files first: the marker must not resurrect them
                self._trash_loose(adir, AdapterKey(tenant, adapter_id, floor + 1))
            write_json_atomic(adir / DELETED_NAME, max(versions))
            for version, path in versions.items():
                if path != adir:
                    self._to_trash(path, AdapterKey(tenant, adapter_id, version))
        log.info("deleted adapter %s/%s (versions %s)", tenant, adapter_id, sorted(versions))
        return [AdapterKey(tenant, adapter_id, v) for v in sorted(versions)]

    def _trash_name(self, key: AdapterKey) -> Path:
        return self.root / TRASH_DIR / f"{key.tenant}+{key.adapter_id}+v{key.version}+{uuid.uuid4().hex[:8]}"

    def _to_trash(self, path: Path, key: AdapterKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            dest = self._trash_name(key)
            os.rename(path, dest)
            os.utime(dest)  # its age in the trash counts from now (`_settled`)

    def _trash_loose(self, adir: Path, key: AdapterKey) -> None:
        dest = self._trash_name(key)
        dest.mkdir()
        for name in (WEIGHTS_NAME, CONFIG_NAME, RECORD_NAME):  # weights first: config alone never resolves
            with contextlib.suppress(FileNotFoundError):
                os.rename(adir / name, dest / name)
        fsync_dir(adir)
        os.utime(dest)

    def _settled(self, path: Path) -> bool:
        """Shared store: `path` (the newest version, or a trash entry) is older than the grace period.
        Within it, another replica may have resolved the version it replaced and not yet read its files."""
        return self.shared_grace_s is None or time.time() - _mtime(path) >= self.shared_grace_s

    # --------------------------------------------------- garbage collection
    def collect_garbage(self, is_pinned: Callable[[AdapterKey], bool] | None = None,
                        only: tuple[str, str] | None = None) -> int:
        """Remove superseded and deleted versions that no running request holds; return how many wait on pins.

        `is_pinned` comes from the adapter manager's pin counts; without it
        nothing that may be in use is removed (only at start-up, see `sweep`).
        `only=(tenant, id)` limits the superseded-version scan to one adapter.
        """
        if is_pinned is None:
            return 0
        pending = 0
        targets = [only] if only is not None else [(t, a) for t in self.tenants() for a in self.adapter_ids(t)]
        for tenant, adapter_id in targets:
            pending += self._drop_superseded(tenant, adapter_id, is_pinned)
        for entry in list((self.root / TRASH_DIR).iterdir()):
            key = _trash_key(entry.name)
            if (key is not None and is_pinned(key)) or not self._settled(entry):
                pending += 1
            else:
                shutil.rmtree(entry, ignore_errors=True)
        return pending

    def collect_garbage_soon(self, is_pinned: Callable[[AdapterKey], bool], only: tuple[str, str] | None = None,
                             retry_s: float = 1.0) -> None:
        """Collect now; while pinned versions remain, retry on a timer until their requests end."""
        if self.collect_garbage(is_pinned, only) == 0:
            return
        with _LOCKS_GUARD:
            if self._gc_timer is not None and self._gc_timer.is_alive():
                return
            self._gc_timer = threading.Timer(retry_s, self.collect_garbage_soon, args=(is_pinned, None, retry_s))
            self._gc_timer.daemon = True
            self._gc_timer.start()

    def _drop_superseded(self, tenant: str, adapter_id: str, is_pinned: Callable[[AdapterKey], bool]) -> int:
        """Trash every version but the newest that no request pins; return how many stay pinned."""
        adir = self.adapter_dir(tenant, adapter_id)
        pending = 0
        with self.lock(tenant, adapter_id):
            versions = self._versions(adir)
            newest = max(versions, default=0)
            settled = newest == 0 or self._settled(versions[newest])
            for version, path in versions.items():
                key = AdapterKey(tenant, adapter_id, version)
                if version == newest:
                    continue
                if is_pinned(key) or not settled:
                    pending += 1
                elif path == adir:
                    self._trash_loose(adir, key)
                else:
                    self._to_trash(path, key)
        return pending

    def sweep(self) -> None:
        """Start-up: no request runs yet, so every staging dir, trash entry and old version can go."""
        for sub in (TMP_DIR, TRASH_DIR):
            for entry in list((self.root / sub).iterdir()):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for tenant in self.tenants():
            tdir = self.root / tenant
            for adir in tdir.iterdir():
                if adir.is_dir():
                    self._sweep_dead_versions(adir)
        self.collect_garbage(lambda key: False)
        shutil.rmtree(self.root / TRASH_DIR, ignore_errors=True)
        (self.root / TRASH_DIR).mkdir(exist_ok=True)

    def _sweep_dead_versions(self, adir: Path) -> None:
        """Version dirs at or below the delete marker (a crash mid-delete left them)."""
        floor = self._deleted_through(adir)
        for child in list(adir.iterdir()):
            m = VERSION_RE.fullmatch(child.name)
            if m and int(m.group(1)) <= floor:
                shutil.rmtree(child, ignore_errors=True)


def _trash_key(name: str) -> AdapterKey | None:
    parts = name.split("+")
    if len(parts) != 4 or not parts[2].startswith("v") or not parts[2][1:].isdigit():
        return None
    return AdapterKey(parts[0], parts[1], int(parts[2][1:]))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def open_store(root: Path, base: Any = None, limits: AdapterLimits | None = None,
               shared_grace_s: float | None = None) -> AdapterStore:
    """The store as the server opens it at start-up: described by the engine's validator, then swept.

    Sweeping is safe only here, before any request runs: staging dirs of
    uploads cut by a crash, trashed and superseded versions all go. It is safe
    only for the one server on this store, so the store's lock comes first
    (StoreInUse while another process holds it). `shared_grace_s` set: one
    replica of a cluster (shared lock, no sweep: the cluster swept before its
    replicas started, and others may be running now).
    """
    shared = shared_grace_s is not None
    release = acquire_store_lock(root, shared=shared)
    describe: Describer | None = None
    if base is not None and limits is not None:
        def describe(path: Path) -> dict[str, Any]:
            return read_adapter(path, base, limits).summary()
    try:
        store = AdapterStore(root, describe=describe, shared_grace_s=shared_grace_s)
        if not shared:
            store.sweep()
    except BaseException:
        release()
        raise
    store._release_lock = release
    return store

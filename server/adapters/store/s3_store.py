"""The adapter store in a shared S3-compatible bucket: what lets several servers serve one set of adapters.

Layout: see pointer.py. Every server reads an adapter's pointer from the bucket
on each resolve (one small GET), so an upload through any server is served by
all of them from the next request on; the bytes of a version are downloaded
once per server into its local `VersionCache`, verified against the SHA-256
the pointer records, and read from there by the engine's loader.

Publish: claim the next version number (a conditional PUT of its record,
If-None-Match), write its files, then swap the pointer (If-Match on the ETag it
was read at); a publisher that loses the swap to another server removes its
objects and starts again. Readers only ever fetch the objects of the version
the pointer named, so a concurrent delete or re-upload makes a download fail
(the reader reads the pointer again), never mixes files. Superseded and deleted
versions' objects are removed after the change, by the server that made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server.adapters.ids import TENANT_RE, check_adapter_id, check_tenant, is_valid_name
from server.adapters.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME
from server.adapters.store.fsutil import file_digest
from server.adapters.store.object_store import ObjectStore, PreconditionFailed, S3Options
from server.adapters.store.pointer import NONE, POINTER_NAME, FileDigest, Pointer, PointerCorrupt
from server.adapters.store.store import RECORD_NAME, StoredVersion, check_marker, names_as_422, not_found
from server.adapters.store.version_cache import VersionCache
from server.adapters.types import AdapterKey, AdapterRef
from server.errors import ApiError, ClientGone, Conflict, InvalidRequest, StoreUnavailable

log = logging.getLogger(__name__)

FILES = (CONFIG_NAME, WEIGHTS_NAME)
VERSION_KEY_RE = re.compile(r"/v(\d{6,})/[^/]+$")
RESOLVE_ATTEMPTS = 3  # a version superseded mid-download: read the pointer again
PUBLISH_ATTEMPTS = 4  # another server committed between our pointer read and our swap
CLAIM_ATTEMPTS = 16  # version numbers taken by racing (or crashed) publishers
LIST_WORKERS = 8
DOWNLOAD_STRIPES = 64


class S3AdapterStore:
    def __init__(self, objects: ObjectStore, cache: VersionCache) -> None:
        self.objects = objects
        self.cache = cache
        self._pool = ThreadPoolExecutor(LIST_WORKERS, thread_name_prefix="s3-store")
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._downloads = [threading.Lock() for _ in range(DOWNLOAD_STRIPES)]  # one download per version
        self._pending: set[AdapterKey] = set()  # local copies to drop once no request pins them
        self._gc_timer: threading.Timer | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._gc_timer is not None:
            self._gc_timer.cancel()

    # ------------------------------------------------------------------ keys
    def _prefix(self, tenant: str, adapter_id: str) -> str:
        with names_as_422():
            return self.objects.location.key(check_tenant(tenant), check_adapter_id(adapter_id))

    def _version_key(self, tenant: str, adapter_id: str, version: int, name: str) -> str:
        return f"{self._prefix(tenant, adapter_id)}/v{version:06d}/{name}"

    def _lock(self, tenant: str, adapter_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((tenant, adapter_id), threading.Lock())

    def _read_pointer(self, tenant: str, adapter_id: str, skip_corrupt: bool = False) -> tuple[Pointer, str | None]:
        """The adapter's pointer and its ETag (NONE, None: never published). A corrupt one is a 503 for
        that adapter, or, in listings (`skip_corrupt`), left out so the others still list."""
        got = self.objects.get(f"{self._prefix(tenant, adapter_id)}/{POINTER_NAME}")
        if got is None:
            return NONE, None
        try:
            return Pointer.from_bytes(got[0]), got[1]
        except PointerCorrupt as e:
            log.error("adapter store: %s/%s has a corrupt pointer: %s", tenant, adapter_id, e)
            if skip_corrupt:
                return NONE, None
            raise StoreUnavailable(f"adapter {adapter_id!r} cannot be read from the store; "
                                   "an operator must repair or delete it") from None

    def _ref(self, tenant: str, adapter_id: str, pointer: Pointer) -> AdapterRef:
        key = AdapterKey(tenant, adapter_id, pointer.version or 0)
        return AdapterRef(key, self.cache.path(key, pointer.digest))

    # --------------------------------------------------------------- reading
    def resolve(self, tenant: str, adapter_id: str) -> AdapterRef:
        """The pointer's version, its files verified on local disk; NotFound (no tenant leak) if none."""
        for _ in range(RESOLVE_ATTEMPTS):
            pointer, _ = self._read_pointer(tenant, adapter_id)
            if not pointer.live:
                raise not_found(adapter_id)
            ref = self._ref(tenant, adapter_id, pointer)
            if self.cache.hit(ref.path) or self._download(ref, pointer):
                return ref
        raise StoreUnavailable(f"adapter {adapter_id!r} changed while it was being read; retry")

    def _download(self, ref: AdapterRef, pointer: Pointer) -> bool:
        """Fetch exactly the version the pointer names and verify every file; False when its objects are
        gone (superseded or deleted meanwhile)."""
        if set(pointer.files) != set(FILES):
            raise StoreUnavailable(f"adapter {ref.key.adapter_id!r} has an unreadable pointer in the store")
        with self._downloads[hash(ref.key) % DOWNLOAD_STRIPES]:
            if self.cache.hit(ref.path):  # another request of ours fetched it meanwhile
                return True
            with self.cache.scratch() as tmp:
                for name, want in pointer.files.items():
                    key = self._version_key(ref.key.tenant, ref.key.adapter_id, ref.key.version, name)
                    got = self.objects.download(key, tmp / name)
                    if got is None:
                        return False
                    if got != (want.sha256, want.size):
                        log.error("adapter store: %s %s has sha256 %s (%d bytes), its pointer says %s (%d bytes)",
                                  ref.key, name, got[0], got[1], want.sha256, want.size)
                        raise StoreUnavailable(f"adapter {ref.key.adapter_id!r} version {ref.key.version} failed "
                                               "its checksum in the store and is not served; upload it again")
                (tmp / RECORD_NAME).write_text(json.dumps(pointer.record))
                self.cache.install(tmp, ref.path)
        return True

    def get(self, tenant: str, adapter_id: str) -> StoredVersion:
        pointer, _ = self._read_pointer(tenant, adapter_id)
        if not pointer.live:
            raise not_found(adapter_id)
        return self._stored(tenant, adapter_id, pointer)

    def _stored(self, tenant: str, adapter_id: str, pointer: Pointer) -> StoredVersion:
        record = {**pointer.record, "id": adapter_id, "tenant": tenant, "version": pointer.version}
        return StoredVersion(self._ref(tenant, adapter_id, pointer), record)

    def tenants(self) -> list[str]:
        return [t for t in self.objects.children(self.objects.location.prefix) if TENANT_RE.fullmatch(t)]

    def adapter_ids(self, tenant: str) -> list[str]:
        return [s.ref.key.adapter_id for s in self.list(tenant)]

    def list(self, tenant: str | None = None) -> list[StoredVersion]:
        """Every live adapter of one tenant (None: all tenants), pointers read in parallel."""
        pairs = []
        for t in [tenant] if tenant is not None else self.tenants():
            with names_as_422():
                check_tenant(t)
            pairs += [(t, a) for a in self.objects.children(self.objects.location.key(t)) if is_valid_name(a)]
        pointers = list(self._pool.map(lambda pair: self._read_pointer(*pair, skip_corrupt=True)[0], pairs))
        return [self._stored(t, a, p) for (t, a), p in zip(pairs, pointers) if p.live]

    def newest_first(self) -> Iterator[AdapterRef]:
        """Every live version, newest first, each downloaded as it is reached (the warm-up stops early)."""
        try:
            stored = sorted(self.list(), key=lambda s: str(s.record.get("created_at", "")), reverse=True)
        except StoreUnavailable:
            log.warning("adapter store unreachable: no adapters prefetched")
            return
        for s in stored:
            try:
                yield self.resolve(s.ref.key.tenant, s.ref.key.adapter_id)
            except ApiError as e:
                log.warning("prefetch of %s skipped: %s", s.ref.key, e.message)

    # ---------------------------------------------------------------- markers
    def has_marker(self, tenant: str, adapter_id: str, name: str) -> bool:
        return self.objects.exists(f"{self._prefix(tenant, adapter_id)}/{check_marker(name)}")

    def set_marker(self, tenant: str, adapter_id: str, name: str, present: bool) -> None:
        key = f"{self._prefix(tenant, adapter_id)}/{check_marker(name)}"
        if present:
            self.objects.put(key, b"")
        else:
            self.objects.delete([key])

    # --------------------------------------------------------------- writing
    def staging(self) -> contextlib.AbstractContextManager[Path]:
        return self.cache.scratch()

    def publish(self, tenant: str, adapter_id: str, staged: Path, summary: dict[str, Any],
                abandoned: Callable[[], bool] = lambda: False) -> StoredVersion:
        """Upload a fully validated staging dir as the newest version; the pointer swap is the commit."""
        self._prefix(tenant, adapter_id)  # 422 for a bad name before any byte moves
        if not all((staged / name).is_file() for name in FILES):
            raise InvalidRequest(f"an adapter needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        files = {name: FileDigest(*file_digest(staged / name)) for name in FILES}
        with self._lock(tenant, adapter_id):
            if abandoned():
                raise ClientGone("the client disconnected before the upload was published; nothing was stored")
            for _ in range(PUBLISH_ATTEMPTS):
                pointer, etag = self._read_pointer(tenant, adapter_id)
                version, record = self._claim(tenant, adapter_id, pointer, files[WEIGHTS_NAME], summary)
                for name in FILES:
                    self.objects.put_file(self._version_key(tenant, adapter_id, version, name), staged / name)
                new = Pointer(version, pointer.deleted_through, files, record)
                if self._swap(tenant, adapter_id, new, etag):
                    break
                self._remove_versions(tenant, adapter_id, [version])  # another server won: ours is an orphan
            else:
                raise Conflict(f"adapter {adapter_id!r} is being changed by other servers; retry")
        log.info("published adapter %s/%s v%d to %s (%d bytes)", tenant, adapter_id, version,
                 self.objects.location, files[WEIGHTS_NAME].size)
        stored = self._stored(tenant, adapter_id, new)
        try:  # this server never downloads what it uploaded; failing that, its first resolve will
            (staged / RECORD_NAME).write_text(json.dumps(record))
            self.cache.install(staged, stored.ref.path)
        except OSError as e:
            log.warning("adapter cache: kept no local copy of %s: %s", stored.ref.key, e)
        return stored

    def _claim(self, tenant: str, adapter_id: str, pointer: Pointer, weights: FileDigest,
               summary: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Take the next free version number by creating its record object (If-None-Match: *)."""
        version = pointer.newest_number
        for _ in range(CLAIM_ATTEMPTS):
            version += 1
            record = {"id": adapter_id, "tenant": tenant, **summary, "size_bytes": weights.size,
                      "sha256": weights.sha256, "version": version,
                      "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:
                self.objects.put(self._version_key(tenant, adapter_id, version, RECORD_NAME),
                                 json.dumps(record).encode(), if_absent=True)
                return version, record
            except PreconditionFailed:
                continue
        raise Conflict(f"adapter {adapter_id!r} is being changed by other servers; retry")

    def _swap(self, tenant: str, adapter_id: str, new: Pointer, etag: str | None) -> bool:
        """Replace the pointer only if it is still the one read (ETag); False when another server changed it."""
        key = f"{self._prefix(tenant, adapter_id)}/{POINTER_NAME}"
        try:
            if etag is None:
                self.objects.put(key, new.to_bytes(), if_absent=True)
            else:
                self.objects.put(key, new.to_bytes(), if_match=etag)
        except PreconditionFailed:
            return False
        return True

    def delete(self, tenant: str, adapter_id: str) -> list[AdapterKey]:
        """Stop serving the adapter on every server now (a tombstone pointer); files go in `collect_garbage`."""
        with self._lock(tenant, adapter_id):
            for _ in range(PUBLISH_ATTEMPTS):
                pointer, etag = self._read_pointer(tenant, adapter_id)
                if not pointer.live:
                    raise not_found(adapter_id)
                if self._swap(tenant, adapter_id, Pointer(None, pointer.newest_number), etag):
                    break
            else:
                raise Conflict(f"adapter {adapter_id!r} is being changed by other servers; retry")
        log.info("deleted adapter %s/%s (through v%d) in %s", tenant, adapter_id, pointer.newest_number,
                 self.objects.location)
        return [AdapterKey(tenant, adapter_id, pointer.newest_number)]

    # --------------------------------------------------- garbage collection
    def collect_garbage(self, is_pinned: Callable[[AdapterKey], bool], only: tuple[str, str] | None = None) -> int:
        """Remove one adapter's dead versions from the bucket, and local copies no request pins;
        returns how many local copies wait on pins."""
        if only is not None:
            pointer, _ = self._read_pointer(*only)
            prefix = self._prefix(*only)
            stored = {int(m.group(1)) for k in self.objects.keys(prefix) if (m := VERSION_KEY_RE.search(k))}
            # Above the pointer's numbers: another server's publish in flight, not garbage.
            self._remove_versions(*only, [v for v in stored if v != pointer.version and v <= pointer.newest_number])
            with self._guard:
                self._pending |= {AdapterKey(*only, v) for v in self.cache.versions(*only) if v != pointer.version}
        pending = 0
        with self._guard:
            for key in list(self._pending):
                if is_pinned(key):
                    pending += 1
                else:
                    self.cache.drop(key)
                    self._pending.discard(key)
        return pending

    def collect_garbage_soon(self, is_pinned: Callable[[AdapterKey], bool], only: tuple[str, str] | None = None,
                             retry_s: float = 1.0) -> None:
        """Collect now; while pinned copies remain, retry on a timer. An unreachable bucket leaves the
        garbage for the next change (the publish or delete that called this already happened)."""
        try:
            if self.collect_garbage(is_pinned, only) == 0:
                return
        except StoreUnavailable:
            log.warning("adapter store: garbage of %s left for later (store unreachable)", only)
            return
        with self._guard:
            if self._gc_timer is not None and self._gc_timer.is_alive():
                return
            self._gc_timer = threading.Timer(retry_s, self.collect_garbage_soon, args=(is_pinned, None, retry_s))
            self._gc_timer.daemon = True
            self._gc_timer.start()

    def _remove_versions(self, tenant: str, adapter_id: str, versions: list[int]) -> None:
        if versions:
            self.objects.delete([self._version_key(tenant, adapter_id, v, name)
                                 for v in versions for name in (*FILES, RECORD_NAME)])


def open_s3_store(options: S3Options, local_root: Path, cache_bytes: int, min_age_s: float = 60.0) -> S3AdapterStore:
    """The store as a server opens it at start-up: the bucket must answer (StoreUnavailable otherwise).

    The local cache lives under `local_root/.s3cache/<id>`, one per endpoint + bucket + prefix, so
    pointing a server at another bucket never reuses a cached version.
    """
    where = f"{options.endpoint_url or ''}|{options.location.bucket}|{options.location.prefix}"
    cache = VersionCache(Path(local_root) / ".s3cache" / hashlib.sha256(where.encode()).hexdigest()[:16],
                         cache_bytes, min_age_s)
    cache.sweep()
    objects = ObjectStore(options)
    objects.check()
    log.info("adapter store: %s (endpoint %s), local cache %s (bound %d bytes)", options.location,
             options.endpoint_url or "AWS", cache.root, cache_bytes)
    return S3AdapterStore(objects, cache)

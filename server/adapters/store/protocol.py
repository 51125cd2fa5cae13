"""What the rest of the server needs from an adapter store, whichever backend holds the bytes.

Two backends plug in at construction (server/app.py): `AdapterStore`, a local
directory (the embedded default), and `S3AdapterStore`, a shared S3-compatible
bucket with a local disk cache. Both keep immutable versions, publish
atomically and never serve a mix of two versions; a resolved `AdapterRef.path`
is a local directory the engine's loader reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from server.adapters.store.store import StoredVersion
from server.adapters.types import AdapterKey, AdapterRef


class AdapterStorage(Protocol):
    def resolve(self, tenant: str, adapter_id: str) -> AdapterRef:
        """The newest live version, its files on local disk; NotFound (no tenant leak) if none."""
        ...

    def get(self, tenant: str, adapter_id: str) -> StoredVersion:
        """The newest live version's record (its files need not be local yet)."""
        ...

    def list(self, tenant: str | None = None) -> list[StoredVersion]: ...

    def tenants(self) -> list[str]: ...

    def adapter_ids(self, tenant: str) -> list[str]: ...

    def newest_first(self) -> Iterable[AdapterRef]:
        """Every live version, most recently published first, each local when yielded (warm-up)."""
        ...

    def staging(self) -> AbstractContextManager[Path]:
        """A fresh local dir to write an upload into; gone on exit unless published."""
        ...

    def publish(self, tenant: str, adapter_id: str, staged: Path, summary: dict[str, Any],
                abandoned: Callable[[], bool] = lambda: False) -> StoredVersion: ...

    def delete(self, tenant: str, adapter_id: str) -> list[AdapterKey]: ...

    def collect_garbage_soon(self, is_pinned: Callable[[AdapterKey], bool], only: tuple[str, str] | None = None,
                             retry_s: float = 1.0) -> None:
        """Drop superseded and deleted versions' files once no request of this server pins them."""
        ...

    def has_marker(self, tenant: str, adapter_id: str, name: str) -> bool:
        """A small flag kept with the adapter (a dedication's `.merged`), shared like the adapter."""
        ...

    def set_marker(self, tenant: str, adapter_id: str, name: str, present: bool) -> None: ...

    def close(self) -> None: ...

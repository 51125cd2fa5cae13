"""One adapter lifecycle for every producer: the upload route, the trainer and start-up.

Publishing is validate (the serving side's own reader, against the loaded
base) → publish (the store's atomic rename) → collect superseded files once no
request holds them → keep the validated copy in the host tier; a dedicated
adapter's merged copy is then rebuilt. Deleting forgets every cached and merged
copy before collecting. Whoever produced the files, the same steps run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from server.adapters.limits import AdapterLimits
from server.adapters.weights.loaded import LoadedAdapter
from server.adapters.residency.manager import AdapterManager
from server.adapters.merge.merge import MergeRegistry
from server.adapters.merge.recipes import Recipe, read_member, write_recipe
from server.adapters.peft.peft_format import read_adapter
from server.adapters.store.protocol import AdapterStorage
from server.adapters.store.store import StoredVersion
from server.adapters.types import AdapterKey
from server.errors import AdapterError, ApiError, Conflict
from server.model.load import BaseModel

log = logging.getLogger(__name__)


class RequestQueue(Protocol):
    """Whether a queued (not yet admitted, so not yet pinned) request waits for this version."""

    def is_queued(self, adapter_key: AdapterKey) -> bool: ...


def summarize(loaded: LoadedAdapter) -> dict[str, Any]:
    """The record fields the validator knows (type, variant, rank, target modules, tensor bytes)."""
    return dict(loaded.summary())


class AdapterService:
    def __init__(self, base: BaseModel, store: AdapterStorage, limits: AdapterLimits,
                 manager: AdapterManager | None = None, merge: MergeRegistry | None = None,
                 queue: RequestQueue | None = None, keep_uploads: bool = False) -> None:
        """`manager`, `merge`, `queue`: the serving side; None when only files are produced (the
        examples trainer, tests). `keep_uploads`: a validated upload stays in the host tier."""
        self.base, self.store, self.limits = base, store, limits
        self.manager, self.merge, self.queue = manager, merge, queue
        self.keep_uploads = keep_uploads

    def start(self) -> None:
        """At start-up: warm the host tier (newest first) and rebuild the dedicated adapters' copies."""
        if self.manager is not None and self.keep_uploads:
            self.manager.prefetch(self.store.newest_first)
        if self.merge is not None:
            self.merge.restore()

    # -- publish (blocking: call off the event loop) ----------------------------
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        with self.store.staging() as staged:
            yield staged

    def validate(self, path: Path) -> LoadedAdapter:
        """Full validation with the engine's reader against the loaded base model."""
        try:
            return read_adapter(path, self.base, self.limits)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader bug must still be a clean 4xx for this adapter
            log.exception("adapter validation failed unexpectedly")
            raise AdapterError(f"adapter could not be read: {type(e).__name__}: {e}") from None

    def publish(self, tenant: str, adapter_id: str, staged: Path, extra: dict[str, Any] | None = None,
                abandoned: Callable[[], bool] = lambda: False) -> StoredVersion:
        """Validate `staged` and make it the newest version; `extra` joins its record."""
        loaded = self.validate(staged)
        stored = self.store.publish(tenant, adapter_id, staged, {**summarize(loaded), **(extra or {})}, abandoned)
        self._collect(tenant, adapter_id)
        if self.manager is not None and self.keep_uploads:
            self.manager.adopt(stored.ref, loaded)  # validation loaded it: the first request skips the read
        return stored

    def publish_recipe(self, tenant: str, adapter_id: str, members: Sequence[str], recipe: Recipe,
                       abandoned: Callable[[], bool] = lambda: False) -> StoredVersion:
        """A new version of `adapter_id` combined from the tenant's `members` (merge/recipes.py), published
        like an upload; a member the tenant lacks is NotFound, as for any adapter."""
        recipe.check()
        refs = [self.store.resolve(tenant, m) for m in members]
        with self.staging() as staged:
            try:
                read = [read_member(m, ref.path, self.limits) for m, ref in zip(members, refs)]
            except FileNotFoundError:
                raise Conflict("a member was replaced or deleted while the recipe read it; retry") from None
            write_recipe(read, recipe, self.base.model, staged)
            return self.publish(tenant, adapter_id, staged, {"recipe": recipe.record(members)}, abandoned)

    async def settle(self, tenant: str, adapter_id: str) -> None:
        """After a publish: a dedicated adapter's new version is merged before the caller answers."""
        if self.merge is not None:
            await self.merge.refresh(tenant, adapter_id)

    # -- delete -------------------------------------------------------------------
    def delete(self, tenant: str, adapter_id: str) -> None:
        """Delete every version (NotFound when none); no cached or merged copy survives it."""
        self.store.delete(tenant, adapter_id)
        if self.merge is not None:
            self.merge.forget(tenant, adapter_id)
        if self.manager is not None:
            self.manager.forget(tenant, adapter_id)
        self._collect(tenant, adapter_id)

    # -- reads --------------------------------------------------------------------
    def get(self, tenant: str, adapter_id: str) -> StoredVersion:
        return self.store.get(tenant, adapter_id)

    def live_state(self, key: AdapterKey) -> dict[str, Any]:
        """The record's live fields: served from a merged copy, resident in a device slot."""
        if self.manager is None:
            return {"mode": "unmerged", "resident": False}
        merged = self.manager.is_merged(key.tenant, key.adapter_id, key.version)
        return {"mode": "merged" if merged else "unmerged",
                "resident": self.manager.is_resident(key.tenant, key.adapter_id)}

    def _collect(self, tenant: str, adapter_id: str) -> None:
        """Collect superseded files once no request holds them.

        A re-upload does not `forget()`: versions are part of the cache key, so the
        new version can never be served from a stale copy, and requests already
        admitted on the old version (queued or running) still find it.
        """
        try:
            self.store.collect_garbage_soon(self._in_use, only=(tenant, adapter_id))
        except OSError:
            log.exception("adapter store garbage collection failed (retried on the next change)")

    def _in_use(self, key: AdapterKey) -> bool:
        # Running requests pin their version in the manager; a queued one has no pin yet, and if its
        # version falls out of the host tier meanwhile, its admission re-reads these very files.
        pinned = self.manager is not None and self.manager.is_pinned(key)
        return pinned or (self.queue is not None and self.queue.is_queued(key))

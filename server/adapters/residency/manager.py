"""AdapterManager: store → host cache → device slot, with pins.

Threads and who calls what:
  - HTTP handlers (event loop): `await prepare(tenant, adapter_id)` resolves the
    newest version through the store and makes sure it is loaded and validated
    in host memory; disk reads and validation run on a small loader pool, and
    concurrent prepares of one key share one load.
  - Engine thread, between steps: `acquire(key)` returns the device slot (pinned)
    or None when the adapter cannot be placed yet (all slots pinned, it is
    being re-read after falling out of the host tier, or its slot copy is still
    in flight on the GPU's copy stream); the request simply waits and the batch
    goes on. An adapter with whole-module copies (modules_to_save) also needs
    rows of the small module-copy pool (copy_rows.py: its own LRU; evicting an
    adapter's copies evicts its slot too). `release(key)` unpins when a request
    ends. Only this thread issues slot copies; a slot is handed out once its
    copy's fence is done (transfer.py), and a slot whose copy is in flight is
    never evicted.
  - HTTP handlers: `await prepare_mix(tenant, [(adapter_id, weight), ...])` prepares each member, then
    the mix (weights/mix.py) as a virtual adapter under its recipe's key (recipe.py), built from the
    members' host copies on the loader pool and cached, slotted and evicted like any adapter.
  - Any thread: `forget(tenant, adapter_id)` after delete / re-upload, `stats()`,
    `is_pinned(key)` (the store's garbage collector), `adopt(ref, adapter)` after
    an upload validated it, `prefetch(refs)` to warm the host tier in the background.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from server.adapters.residency.cache import HostCache, SlotTable
from server.adapters.residency.copy_rows import CopyRows
from server.adapters.residency.recipe import MixRecipe
from server.adapters.runtime.inject import AdapterLayers
from server.adapters.runtime.transfer import Fence
from server.adapters.limits import AdapterLimits
from server.adapters.merge.merge import MergeRegistry
from server.adapters.weights.loaded import LoadedAdapter
from server.adapters.weights.mix import MixMember, check_members, mix_adapters
from server.adapters.peft.peft_format import read_adapter
from server.adapters.store.protocol import AdapterStorage
from server.adapters.types import AdapterKey, AdapterRef
from server.errors import AdapterError
from server.metrics import Metrics, NullMetrics
from server.model.load import BaseModel

log = logging.getLogger(__name__)

Loader = Callable[[Path, BaseModel, AdapterLimits], LoadedAdapter]
CacheEvent = Literal["hit", "miss", "eviction"]
MIX_RECIPES_PER_HOST_ENTRY = 8  # recipes remembered per host-tier entry (a recipe is a few hundred bytes)


class AdapterManager:
    def __init__(self, base: BaseModel, layers: AdapterLayers, store: AdapterStorage, limits: AdapterLimits,
                 metrics: Metrics | None = None, merge: MergeRegistry | None = None, loader: Loader = read_adapter,
                 load_workers: int = 2) -> None:
        self.base, self.layers, self.store, self.limits = base, layers, store, limits
        self.metrics = metrics or NullMetrics()
        self.merge = merge  # dedicated adapters' merged copies; None = every adapter runs unmerged
        self._loader = loader
        self.host = HostCache(limits.max_adapters_host)
        self.slots = SlotTable(layers.num_slots)
        self.copies = CopyRows(0 if layers.copies is None else layers.copies.rows)  # modules_to_save copies
        self._lock = threading.RLock()  # guards slots, refs, errors, inflight
        self._refs: dict[AdapterKey, AdapterRef | MixRecipe] = {}  # where a key's host copy comes from
        self._recipes: OrderedDict[AdapterKey, None] = OrderedDict()  # mixes' keys in _refs, oldest first
        self._errors: dict[AdapterKey, AdapterError] = {}  # versions are immutable: a bad file stays bad
        # The last re-read of a version failed on the file system (gone, unreadable): a request waiting on
        # it fails instead of retrying every step; a later successful read clears it.
        self._read_failures: dict[AdapterKey, AdapterError] = {}
        self._inflight: dict[AdapterKey, Future] = {}
        self._landing: dict[AdapterKey, Fence] = {}  # slot copies issued, not yet known complete
        self._pool = ThreadPoolExecutor(load_workers, thread_name_prefix="adapter-load")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="adapter-prefetch")
        self._closed = False
        self.hits = self.misses = self.evictions = self.copy_evictions = 0
        self.host_hits = self.host_misses = 0

    # -- event loop side -----------------------------------------------------
    async def prepare(self, tenant: str, adapter_id: str) -> AdapterKey:
        """Newest version of the adapter, loaded and validated in host memory (NotFound / AdapterError)."""
        # A directory listing or a GET of the bucket's pointer: either way off the event loop.
        ref = await asyncio.to_thread(self.store.resolve, tenant, adapter_id)
        key = ref.key
        with self._lock:
            self._refs[key] = ref
            ready = key in self.host or key in self.slots.slot_of
        if ready:
            self.host_hits += 1
            self._count("hit", "host")
        else:
            await asyncio.wrap_future(self._load_async(ref))
        await self._reserve_slots(key)
        return key

    async def prepare_mix(self, tenant: str, members: Sequence[tuple[str, float]]) -> AdapterKey:
        """The key of the weighted mix of these adapters' newest versions, built and validated in host
        memory (NotFound for a member the tenant does not have, AdapterError when it cannot be mixed)."""
        check_members([m for m, _ in members], [w for _, w in members])
        keys = [await self.prepare(tenant, adapter_id) for adapter_id, _ in members]
        recipe = MixRecipe(tenant, tuple(sorted(zip(keys, (float(w) for _, w in members)))))
        key = recipe.key
        with self._lock:
            self._remember(recipe)
            ready = key in self.host or key in self.slots.slot_of
        if ready:
            self.host_hits += 1
            self._count("hit", "host")
        else:
            await asyncio.wrap_future(self._load_async(recipe))
        await self._reserve_slots(key)
        return key

    def _remember(self, recipe: MixRecipe) -> None:
        """Keep the recipe (its mix is rebuilt from it when it leaves the host tier), most recent last. A
        client may ask for endless distinct weights: past MIX_RECIPES_PER_HOST_ENTRY × the host tier, the
        oldest recipes with no copy in a tier are forgotten (caller holds the lock)."""
        self._refs[recipe.key] = recipe
        self._recipes.pop(recipe.key, None)
        self._recipes[recipe.key] = None
        excess = len(self._recipes) - MIX_RECIPES_PER_HOST_ENTRY * self.host.capacity
        for key in [k for k in self._recipes if k not in self.host and k not in self.slots.slot_of
                    and k not in self._inflight][:max(excess, 0)]:
            del self._recipes[key]
            self._refs.pop(key, None)
            self._errors.pop(key, None)

    def _build_mix(self, recipe: MixRecipe) -> LoadedAdapter:
        """Loader thread: the mix from its members' host copies (re-read if they aged out meanwhile)."""
        members = []
        for member, weight in recipe.members:
            adapter = self.host.get(member)
            if adapter is None:  # read here, not queued on the pool this thread may be the last worker of
                with self._lock:
                    ref = self._refs[member]
                adapter = self._load(ref)
            members.append(MixMember(member.adapter_id, adapter, weight))
        return mix_adapters(members, self.limits.max_rank, pin=self.base.device.type == "cuda",
                            slot_dtype=self.limits.slot_dtype or self.base.dtype)

    async def _reserve_slots(self, key: AdapterKey) -> None:
        """Grow the slot banks this adapter needs on a loader thread, not on the engine thread at its
        placement, where every running stream would wait for the allocation (slots.py)."""
        with self._lock:
            if key in self.slots.slot_of:
                return
        adapter = self.host.get(key)
        if adapter is not None and self.layers.needs_growth(adapter):
            await asyncio.wrap_future(self._pool.submit(self.layers.reserve, adapter))

    def _load_async(self, ref: AdapterRef | MixRecipe) -> Future:
        with self._lock:
            error = self._errors.get(ref.key)
            if error is not None:
                done: Future = Future()
                done.set_exception(error)
                return done
            fut = self._inflight.get(ref.key)
            if fut is None:
                fut = self._inflight[ref.key] = self._pool.submit(self._load, ref)
            return fut

    def _load(self, ref: AdapterRef | MixRecipe) -> LoadedAdapter:
        key = ref.key
        started = time.perf_counter()
        try:
            if isinstance(ref, MixRecipe):
                adapter = self._build_mix(ref)
            else:
                adapter = self._loader(ref.path, self.base, self.limits)
            evicted = self.host.put(key, adapter)  # before leaving _inflight: no window where it is in neither
            with self._lock:
                self._read_failures.pop(key, None)
        except AdapterError as e:
            if isinstance(ref, MixRecipe) and any(m in self._read_failures for m, _ in ref.members):
                raise  # a member's files are gone: its own failure, not the recipe's
            if isinstance(ref, AdapterRef) and not ref.path.exists():  # deleted or collected, not a bad file
                raise self._read_failed(key, f"version {key.version} is no longer in the store") from None
            with self._lock:
                self._errors[key] = e
            raise
        except OSError as e:  # vanished / unreadable file: not cached as bad, a later prepare may read it
            raise self._read_failed(key, f"could not be read: {e.strerror or e}") from None
        except Exception as e:  # a file our checks missed must still be a clean refusal, never a 5xx
            log.exception("unexpected failure loading adapter %s", key)
            with self._lock:
                self._errors[key] = AdapterError(f"adapter {key.adapter_id!r} could not be loaded: {e}")
            raise self._errors[key] from None
        finally:
            with self._lock:
                self._inflight.pop(key, None)
        self.host_misses += 1
        self._count("miss", "host")
        self._observe_load("host", time.perf_counter() - started)
        self._count_host_evictions(evicted)
        return adapter

    def _read_failed(self, key: AdapterKey, why: str) -> AdapterError:
        error = AdapterError(f"adapter {key.adapter_id!r} {why}")
        with self._lock:
            self._read_failures[key] = error
        return error

    # -- host-tier warm-up (any thread) --------------------------------------
    def adopt(self, ref: AdapterRef, adapter: LoadedAdapter) -> None:
        """An upload just validated (= loaded) this version: keep it, its first request skips the read."""
        with self._lock:
            self._refs[ref.key] = ref
        self._count_host_evictions(self.host.put(ref.key, adapter))

    def prefetch(self, refs: Callable[[], Iterable[AdapterRef]]) -> Future:
        """Load `refs()` (newest first) into the host tier in the background; the future gives the count.

        Why: a request for an adapter in host memory pays a slot copy (ms) instead
        of a disk read and validation (tens of ms on CPU). It never evicts (stops
        when the tier is full) and runs one load at a time through the request
        loaders' pool, so a request queues behind at most one prefetch.
        """
        return self._prefetcher.submit(self._prefetch, refs)

    def _prefetch(self, refs: Callable[[], Iterable[AdapterRef]]) -> int:
        loaded = 0
        for ref in refs():
            if self._closed or len(self.host) >= self.host.capacity:
                break
            with self._lock:
                if ref.key in self._errors or ref.key in self.slots.slot_of or ref.key in self.host:
                    continue
                self._refs.setdefault(ref.key, ref)
            try:
                self._load_async(ref).result()
                loaded += 1
            except Exception as e:  # noqa: BLE001 - a bad file is refused when requested, not here
                log.warning("prefetch of adapter %s skipped: %s", ref.key, e)
        log.info("prefetched %d adapters into the host tier", loaded)
        return loaded

    # -- engine thread -------------------------------------------------------
    def acquire(self, key: AdapterKey) -> int | None:
        """Pin `key` into a device slot; None = not placeable yet (retry next step)."""
        with self._lock:
            slot = self.slots.lookup(key)
            if slot is not None:
                self.copies.touch(key)
                if key in self._landing:  # the miss was counted when its copy was issued
                    return self._pin_landed(key, slot)
                self.slots.pin(key)
                self.hits += 1
                self._count("hit", "device")
                return slot
            adapter = self._host_copy(key)
            if adapter is None:
                return None
            if adapter.saved and not self._free_copy_rows(adapter.saved.copies):
                return None
            slot = self._claim_slot()
            if slot is None:
                return None
            rows = self.copies.take(key, adapter.saved.copies) if adapter.saved else ()
            started = time.perf_counter()
            self._landing[key] = self.layers.load_slot(slot, adapter, rows)
            self._observe_load("device", time.perf_counter() - started)  # issuing it (the engine thread's cost)
            self.slots.assign(key, slot)
            self.misses += 1
            self._count("miss", "device")
            self._set_resident()
            return self._pin_landed(key, slot)

    def _pin_landed(self, key: AdapterKey, slot: int) -> int | None:
        """Pin `key` if its slot copy has completed (the next step then reads it), else None: the
        request waits a step instead of every running stream waiting for the copy."""
        fence = self._landing[key]
        if not fence.done():
            return None
        fence.order_before_compute()
        del self._landing[key]
        self.slots.pin(key)
        return slot

    def _host_copy(self, key: AdapterKey) -> LoadedAdapter | None:
        adapter = self.host.get(key)
        if adapter is not None:
            return adapter
        if key in self._errors:
            raise self._errors[key]
        if key in self._read_failures:  # e.g. deleted while this request queued and its host copy aged out
            raise self._read_failures[key]
        ref = self._refs.get(key)
        if ref is None:
            raise AdapterError(f"adapter {key} was not prepared (or was deleted)")
        self._load_async(ref)  # fell out of the host tier: re-read in the background, caller waits
        return None

    def _claim_slot(self) -> int | None:
        slot = self.slots.free_slot()
        if slot is not None:
            return slot
        self._prune_landed()
        victim = self.slots.victim(busy=self._landing)
        if victim is None:
            return None  # every slot is pinned by a running request
        slot = self.slots.remove(victim)  # its weights stay until load_slot overwrites them (one pass)
        self.copies.remove(victim)
        self.evictions += 1
        self._count("eviction", "device")
        return slot

    def _prune_landed(self) -> None:
        for key, fence in list(self._landing.items()):  # landed, its request gone (cancelled): evictable
            if fence.done():
                del self._landing[key]

    def _free_copy_rows(self, count: int) -> bool:
        """Make `count` module-copy rows free, evicting the least recently used adapters holding rows
        (their slots go with them: an adapter is resident only with its copies); False = wait."""
        self._prune_landed()
        victims = self.copies.victims(count, lambda k: not self.slots.is_pinned(k) and k not in self._landing,
                                      first=self.slots.doomed)
        if victims is None:
            return False
        for victim in victims:
            self._drop(victim)
            self.evictions += 1
            self.copy_evictions += 1
            self._count("eviction", "device")
        return True

    def _drop(self, key: AdapterKey) -> None:
        """Take `key` off the device now: its slot cleared, its copy rows freed."""
        self.layers.clear_slot(self.slots.remove(key))
        self.copies.remove(key)
        self._set_resident()

    def pin(self, key: AdapterKey) -> None:
        """Pin without a device slot: a request running on a merged copy (its lane) does no adapter
        math, but its version's files must outlive it like any other (the store's GC asks is_pinned)."""
        with self._lock:
            self.slots.pin(key)

    def release(self, key: AdapterKey) -> None:
        with self._lock:
            if not self.slots.unpin(key):
                log.warning("release of %s which is not pinned", key)
                return
            if key in self.slots.doomed and not self.slots.is_pinned(key):
                self._drop(key)

    # -- any thread ----------------------------------------------------------
    def forget(self, tenant: str, adapter_id: str) -> None:
        """After delete / re-upload: its device slots become the first to evict (freed on the engine thread).

        Host copies stay (the LRU ages them out) and so do refs, so a request that
        prepared an old version before the change still runs on it; new prepares
        resolve through the store and never see an old key again.
        """
        with self._lock:
            def match(k: AdapterKey) -> bool:  # the adapter's versions, and every mix it is a member of
                return (k.tenant, k.adapter_id) == (tenant, adapter_id) or self._mixes(k, tenant, adapter_id)
            for k in [k for k in self._errors if match(k)]:
                del self._errors[k]
            self.slots.doomed.update(k for k in self.slots.slot_of if match(k))

    def _mixes(self, key: AdapterKey, tenant: str, adapter_id: str) -> bool:
        """Whether `key` is a mix with (tenant, adapter_id) among its members (caller holds the lock)."""
        recipe = self._refs.get(key)
        return isinstance(recipe, MixRecipe) and recipe.uses(tenant, adapter_id)

    def is_pinned(self, key: AdapterKey) -> bool:
        with self._lock:
            return self.slots.is_pinned(key)

    def is_resident(self, tenant: str, adapter_id: str) -> bool:
        with self._lock:
            return any((k.tenant, k.adapter_id) == (tenant, adapter_id) and k not in self.slots.doomed
                       for k in self.slots.slot_of)

    # -- merge path: the MergeRegistry (server/adapters/merge/merge.py) decides --
    def lane_of(self, key: AdapterKey) -> int | None:
        """The scheduler's lane seam: the merged copy new requests of `key` run on (engine thread)."""
        return None if self.merge is None else self.merge.lane_of(key)

    def is_merged(self, tenant: str, adapter_id: str, version: int | None = None) -> bool:
        return self.merge is not None and self.merge.is_merged(tenant, adapter_id, version)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "resident": len(self.slots.slot_of),
                "host_entries": len(self.host),
                "host_hits": self.host_hits,
                "host_misses": self.host_misses,
                "host_evictions": self.host.evictions,
                "pinned": self.slots.pinned_count,
                "loading": len(self._inflight),
                "mix_recipes": len(self._recipes),
                "module_copies": len(self.copies),
                "module_copy_evictions": self.copy_evictions,
            }

    def close(self) -> None:
        self._closed = True
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _count_host_evictions(self, evicted: int) -> None:
        for _ in range(evicted):
            self._count("eviction", "host")

    def _set_resident(self) -> None:
        self.metrics.adapters_resident.set(len(self.slots.slot_of))

    def _observe_load(self, tier: str, seconds: float) -> None:
        self.metrics.adapter_load_latency.labels(tier=tier).observe(seconds)

    def _count(self, event: CacheEvent, tier: str) -> None:
        counter = {"hit": self.metrics.adapter_cache_hits, "miss": self.metrics.adapter_cache_misses,
                   "eviction": self.metrics.adapter_cache_evictions}[event]
        counter.labels(tier=tier).inc()

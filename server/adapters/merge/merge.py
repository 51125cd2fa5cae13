"""MergeRegistry: dedicated tenants served from merged copies of the base.

A dedication names (tenant, adapter_id); a merged copy names one version
(AdapterKey) and one lane id, never reused, so a request admitted to a lane
sees one set of weights from its first token to its last.

  dedicate   → newest version resolved → its copy built on a worker thread (off
               the step loop) → on the engine thread, between steps: weights
               into the layers' `merged_weights[lane]`, then key → lane
               published; the scheduler places that key's *new* requests in
               the lane (`lane_of`), running ones stay where they are.
  re-upload  → the same for the new version (`refresh`); when it lands, the old
               version's lane stops taking requests and drains.
  un-dedicate / delete → key → lane unpublished at the next step boundary (new
               requests run unmerged); the copy is dropped once no running
               sequence is in its lane.

Threads: the async methods run on the event loop, builds on one worker
thread, and `between_steps` (an engine step hook) is the only code that
changes what a step can read. The scheduler calls `lane_of` on the engine
thread. Dedications persist as a `.merged` marker in the adapter's store dir
and are rebuilt at start-up (`restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from server.adapters.runtime.inject import AdapterLayers
from server.adapters.limits import AdapterLimits
from server.adapters.merge.merged_copy import MergedCopy, build_merged_copy, install, uninstall
from server.adapters.peft.peft_format import read_adapter
from server.adapters.store.protocol import AdapterStorage
from server.adapters.types import AdapterKey, AdapterRef
from server.errors import AdapterError, ApiError, Conflict, NotFound, Unavailable
from server.metrics import Metrics, NullMetrics
from server.model.load import BaseModel

log = logging.getLogger(__name__)

MARKER = ".merged"
SETTLE_TIMEOUT_S = 600.0  # a build of a large model on a slow device, plus one step boundary
Pair = tuple[str, str]  # (tenant, adapter_id)


@dataclass(eq=False)
class _Build:
    """The copy a dedication wants: `done` → True once published, False if superseded, or the refusal.

    `key` may rise once, on the worker, when the store already holds a newer version than asked for.
    """

    key: AdapterKey
    lane: int
    done: Future


class StepLoop(Protocol):
    """What the registry needs from the engine loop (server.engine.loop.EngineLoop)."""

    alive: bool

    def add_step_hook(self, hook: Callable[[], None]) -> None: ...

    def wake(self) -> None: ...

    def lanes_in_use(self) -> frozenset[int | None]: ...


class MergeRegistry:
    def __init__(self, base: BaseModel, layers: AdapterLayers, store: AdapterStorage, limits: AdapterLimits,
                 metrics: Metrics | None = None, loop: StepLoop | None = None) -> None:
        """`loop`: the engine loop that runs `between_steps`; None = it runs inline (no engine)."""
        self.base, self.layers, self.store, self.limits = base, layers, store, limits
        self.metrics = metrics or NullMetrics()
        self.loop = loop
        self._lock = threading.RLock()
        self._lane_ids = itertools.count(1)
        self._wanted: dict[Pair, _Build] = {}  # dedicated adapters and the copy each wants
        self._live: dict[Pair, MergedCopy] = {}  # published copy per dedicated adapter
        self._lanes: dict[AdapterKey, int] = {}  # published key → lane (what the scheduler reads)
        self._copies: dict[int, MergedCopy] = {}  # installed copies by lane, draining ones included
        self._draining: set[int] = set()  # unpublished lanes waiting for their running sequences
        self._events: list[tuple] = []  # ordered work for the engine thread
        self._dirty = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-merge")
        if loop is not None:
            loop.add_step_hook(self.between_steps)

    # -- event loop side -------------------------------------------------------
    async def dedicate(self, tenant: str, adapter_id: str, mark: bool = True) -> bool:
        """Serve the adapter's newest version from a merged copy; True if a new copy was built.

        Conflict beyond `max_merged` or on a quantized base; AdapterError (422) when the merge is refused.
        `mark=False`: follow a marker another process wrote (a cluster replica), never write it back.
        """
        ref: AdapterRef = await asyncio.to_thread(self.store.resolve, tenant, adapter_id)
        self._check_base(adapter_id)
        pair = (tenant, adapter_id)
        with self._lock:
            build = self._wanted.get(pair)
            created = build is None or build.key.version < ref.key.version
            if build is None and len(self._wanted) >= self.limits.max_merged:
                raise Conflict(
                    f"cannot merge {adapter_id!r}: {len(self._wanted)} merged copies already exist and "
                    f"max_merged is {self.limits.max_merged}; un-merge one first "
                    "(DELETE /v1/adapters/{id}/merge)"
                )
            if created:
                build = self._start(pair, ref.key, ref)
        await self._settle(pair, build)
        with self._lock:
            still = pair in self._wanted
        if still and mark:  # not un-dedicated meanwhile
            await asyncio.to_thread(self._mark, pair, True)
        return created

    async def undedicate(self, tenant: str, adapter_id: str, mark: bool = True) -> None:
        """Back to unmerged: returns once new requests no longer enter the lane."""
        pair = (tenant, adapter_id)
        done: Future = Future()
        with self._lock:
            self._wanted.pop(pair, None)
            self._events.append(("unpublish", pair, done))
        self._kick()
        await _wait(done)
        if mark:
            await asyncio.to_thread(self._mark, pair, False)

    async def refresh(self, tenant: str, adapter_id: str) -> None:
        """After a re-upload: a dedicated adapter gets its new version's copy before the upload answers."""
        with self._lock:
            if (tenant, adapter_id) not in self._wanted:
                return
        try:
            await self.dedicate(tenant, adapter_id)
        except ApiError as e:  # the upload itself stands; the adapter is simply served unmerged
            log.warning("re-merge of %s/%s after upload refused: %s", tenant, adapter_id, e.message)

    # -- any thread --------------------------------------------------------------
    def forget(self, tenant: str, adapter_id: str) -> None:
        """After a delete: no dedication survives it (not even across a restart)."""
        pair = (tenant, adapter_id)
        with self._lock:
            self._wanted.pop(pair, None)
            self._events.append(("unpublish", pair, None))
        self._kick()
        self._mark(pair, False)

    def is_merged(self, tenant: str, adapter_id: str, version: int | None = None) -> bool:
        """Record `mode`: the copy of the newest version (`version`, when the caller knows it) is served."""
        if version is not None:
            self._notice(AdapterKey(tenant, adapter_id, version))
        with self._lock:
            build, live = self._wanted.get((tenant, adapter_id)), self._live.get((tenant, adapter_id))
            return (build is not None and live is not None and live.key == build.key
                    and (version is None or live.key.version >= version))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"dedicated": len(self._wanted), "copies": len(self._copies),
                    "bytes": sum(c.nbytes for c in self._copies.values()), "draining": len(self._draining),
                    "pending": len(self._events)}

    def dedicated(self) -> set[Pair]:
        """The adapters this process serves (or is building) merged copies of."""
        with self._lock:
            return set(self._wanted)

    def marked(self) -> set[Pair]:
        """The adapters whose dedication the store records (any process sharing it may have written it)."""
        return {(tenant, adapter_id) for tenant in self.store.tenants() for adapter_id in self.store.adapter_ids(tenant)
                if self.store.has_marker(tenant, adapter_id, MARKER)}

    def restore(self) -> None:
        """Start-up: rebuild the copies of adapters dedicated before the restart (in the background).

        On a quantized base none is rebuilt and the markers stay: a restart on the plain base restores them."""
        for tenant, adapter_id in sorted(self.marked()):
            if self.base.quantize != "none":
                log.warning("not re-merging %s/%s: the base is quantized (%s), adapters are served unmerged",
                            tenant, adapter_id, self.base.quantize)
                continue
            with self._lock:
                if len(self._wanted) >= self.limits.max_merged:
                    log.warning("not re-merging %s/%s: max_merged reached", tenant, adapter_id)
                    continue
                with contextlib.suppress(ApiError):
                    ref = self.store.resolve(tenant, adapter_id)
                    self._start((tenant, adapter_id), ref.key, ref)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- engine thread -----------------------------------------------------------
    def lane_of(self, key: AdapterKey) -> int | None:
        """The lane new requests of `key` run in (None = shared lane, unmerged)."""
        lane = self._lanes.get(key)
        if lane is None and self._wanted:
            self._notice(key)  # a version published past the upload route (training, files placed by hand)
        return lane

    def _notice(self, key: AdapterKey) -> None:
        """A dedicated adapter seen at a newer version than its copy: build that version's copy (no wait)."""
        pair = (key.tenant, key.adapter_id)
        build = self._wanted.get(pair)
        if build is None or build.key.version >= key.version:
            return
        with self._lock:
            build = self._wanted.get(pair)
            if build is not None and build.key.version < key.version:
                try:
                    self._start(pair, key, None)
                except RuntimeError:  # shutting down: the pool is closed; serve unmerged
                    self._wanted[pair] = build

    def between_steps(self) -> None:
        """Engine step hook: publish built copies, unpublish, drop drained lanes. Cheap when idle."""
        if not self._dirty:
            return
        with self._lock:
            self._dirty = False
            events, self._events = self._events, []
            for event in events:
                if event[0] == "install":
                    self._install(*event[1:])
                else:
                    self._unpublish(event[1])
                    _resolve(event[2], None)
            self._drop_drained()
            self._dirty = bool(self._draining or self._events)
            self._set_gauges()

    def _install(self, pair: Pair, build: _Build, copy: MergedCopy) -> None:
        if self._wanted.get(pair) is not build:  # un-dedicated or superseded while building
            _resolve(build.done, False)
            return
        install(self.layers, copy)  # weights first: the lane is unreachable until published below
        self._copies[copy.lane] = copy
        self._unpublish(pair)
        self._live[pair] = copy
        self._lanes[copy.key] = copy.lane
        log.info("merged copy of %s published (lane %d, %d bytes)", copy.key, copy.lane, copy.nbytes)
        _resolve(build.done, True)

    def _unpublish(self, pair: Pair) -> None:
        old = self._live.pop(pair, None)
        if old is not None:
            self._lanes.pop(old.key, None)
            self._draining.add(old.lane)

    def _drop_drained(self) -> None:
        if not self._draining:
            return
        in_use = self.loop.lanes_in_use() if self.loop is not None else frozenset()
        for lane in [lane for lane in self._draining if lane not in in_use]:
            self._draining.discard(lane)
            copy = self._copies.pop(lane, None)
            if copy is not None:
                uninstall(self.layers, copy)
                log.info("merged copy of %s dropped (lane %d)", copy.key, lane)

    # -- worker thread -----------------------------------------------------------
    def _start(self, pair: Pair, key: AdapterKey, ref: AdapterRef | None) -> _Build:
        """Caller holds the lock. The build replaces whatever this dedication wanted before.

        Without `ref` (a version noticed on the engine thread) the worker resolves it: no disk there.
        """
        build = _Build(key, next(self._lane_ids), Future())
        self._wanted[pair] = build
        self._pool.submit(self._build, pair, ref, build)
        return build

    def _build(self, pair: Pair, ref: AdapterRef | None, build: _Build) -> None:
        try:
            if ref is None:
                ref = self.store.resolve(*pair)
                with self._lock:
                    build.key = max(build.key, ref.key)
            try:
                adapter = read_adapter(ref.path, self.base, self.limits)
            except (AdapterError, OSError) as e:
                raise self._superseded(pair, ref) or e from None
            copy = build_merged_copy(self.layers, adapter, ref.key, build.lane)
        except Exception as e:  # noqa: BLE001 - every refusal reaches the caller as a clean 4xx
            self._refused(pair, build, e)
            return
        with self._lock:
            self._events.append(("install", pair, build, copy))
        self._kick()

    def _superseded(self, pair: Pair, ref: AdapterRef) -> ApiError | None:
        """Why a version could not be read when a re-upload or delete won the race (None: it is still there).

        Its files leaving the store mid-read said "adapter_model.safetensors is missing" (422), a lie.
        """
        try:
            now = self.store.resolve(*pair)
        except NotFound as gone:
            return gone
        if now.key.version == ref.key.version:
            return None
        return Conflict(f"adapter {pair[1]!r} was replaced (version {now.key.version}) while version "
                        f"{ref.key.version} was being merged; retry to merge the new version")

    def _refused(self, pair: Pair, build: _Build, error: Exception) -> None:
        if isinstance(error, OSError):
            error = AdapterError(f"adapter {pair[1]!r} could not be read for merging: {error.strerror or error}")
        elif not isinstance(error, ApiError):
            log.exception("merge of %s failed unexpectedly", build.key, exc_info=error)
            error = AdapterError(f"adapter {pair[1]!r} could not be merged: {type(error).__name__}: {error}")
        log.warning("merge of %s refused: %s", build.key, error)
        with self._lock:
            if self._wanted.get(pair) is build:  # a refused copy leaves no dedication behind
                del self._wanted[pair]
                self._events.append(("unpublish", pair, None))
        self._kick()
        self._mark(pair, False)
        build.done.set_exception(error)

    # -- helpers -----------------------------------------------------------------
    def _check_base(self, adapter_id: str) -> None:
        """Refused on a quantized base, rather than serving a merged copy that is either dense (the bytes
        quantization saved, spent again per copy) or requantized (outputs that differ from unmerged serving
        by the rounding of W + ΔW)."""
        if self.base.quantize != "none":
            raise Conflict(f"cannot merge {adapter_id!r}: the base model is quantized ({self.base.quantize} "
                           "weight-only), and a merged copy would be either dense (the memory quantization "
                           "saved) or requantized (outputs no longer those of the adapter); it stays served "
                           "unmerged, with the same outputs")

    async def _settle(self, pair: Pair, build: _Build) -> None:
        """Wait until the wanted copy is published, following rebuilds that superseded it."""
        while not await _wait(build.done):
            with self._lock:
                build = self._wanted.get(pair)
            if build is None:
                return  # un-dedicated meanwhile: the later call wins

    def _kick(self) -> None:
        """Get `between_steps` run: by the engine thread, or here when no engine loop is running."""
        self._dirty = True
        loop = self.loop
        if loop is not None and loop.alive:
            loop.wake()
        else:
            self.between_steps()

    def _mark(self, pair: Pair, dedicated: bool) -> None:
        """The `.merged` marker that makes a dedication survive a restart (best effort)."""
        with contextlib.suppress(OSError, ApiError):
            self.store.set_marker(*pair, MARKER, dedicated)

    def _set_gauges(self) -> None:
        self.metrics.merged_copies.set(len(self._copies))
        self.metrics.merged_bytes.set(sum(c.nbytes for c in self._copies.values()))


def _resolve(future: Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


async def _wait(future: Future) -> Any:
    """Await a thread future without letting a timed-out waiter cancel it for the others."""
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), SETTLE_TIMEOUT_S)
    except TimeoutError:
        raise Unavailable("the merged copy was not published in time (is the engine running?)") from None

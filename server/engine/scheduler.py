"""Iteration-level scheduling: who joins the batch, and what each step computes.

Each step the scheduler (1) drops cancelled requests, (2) admits waiting
requests while KV rows and batch room remain — a request whose adapter is not
ready yet keeps waiting without blocking those behind it; the order is the
tenants' fair share (server/engine/fairness.py), and a tenant below its share
may preempt a running sequence of one above it (server/engine/preemption.py),
and a short prefill admitted that way runs in a step of its own, so its first
token does not wait behind a full batch's decode — and (3) plans one
step: one decode token for every running sequence of the chosen lane, plus
prefill chunks that fit the token budget, so a long prompt is prefilled over
several steps instead of stalling everyone's decoding.

Lanes: a sequence whose adapter is served by a merged copy of the base (an
`AdapterMapping.lane`) runs in that copy's lane; a step runs one lane
only, and lanes with work take turns (round-robin), the shared lane included.

Thread-safety: the waiting queue (`server/engine/waiting.py`) may be used from any
thread; every method here runs on the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from server.adapters.runtime.mapping import BASE_SLOT
from server.engine.fairness import AdmissionPass, FairShare
from server.engine.kv_cache import KVCache
from server.engine.preemption import Preemption
from server.engine.prefix_cache import namespace
from server.engine.request import Request
from server.engine.sequence import Sequence
from server.engine.waiting import WaitingQueue
from server.errors import NotFound

log = logging.getLogger(__name__)

NewSequence = Callable[[Request, int, int, int | None, int], Sequence]  # (request, row, slot, lane, index)


class AdapterPlacement(Protocol):
    """Where an adapter request runs: a device slot (pinned until `release`), or a merged copy's lane."""

    def acquire(self, key: Hashable) -> int | None:
        """The device slot holding `key`, pinned; None = not resident yet (the request waits)."""

    def release(self, key: Hashable) -> None: ...

    def lane_of(self, key: Hashable) -> int | None:
        """The lane of a merged copy serving `key` (no adapter math), or None."""

    def pin(self, key: Hashable) -> None:
        """Hold `key`'s version for a request that runs in a merged lane (no device slot)."""


class PrefixLookup(Protocol):
    """The prefix cache as admission sees it (server.engine.prefix_cache.PrefixCache)."""

    block_tokens: int

    def cached_tokens(self, namespace: Hashable, prompt: list[int]) -> int:
        """Tokens of `prompt` a new sequence would copy from the cache now."""


@dataclass
class StepPlan:
    lane: int | None
    decode: list[Sequence]  # one token each, sorted by KV row
    prefill: list[tuple[Sequence, int]]  # (sequence, chunk length)
    # Resumed sequences among `prefill`: the tokens they recompute (prompt + output[:-1]); they sample nothing.
    refill: dict[Sequence, list[int]] = field(default_factory=dict)
    urgent: bool = False  # the short prefills of sequences admitted by preempting, in a step of their own

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def chunk(self, s: Sequence, n: int) -> list[int]:
        """The token ids of `s`'s next `n`-token prefill chunk."""
        source = self.refill.get(s, s.request.prompt_ids)
        return source[s.prefilled:s.prefilled + n]

    def samples(self, s: Sequence, n: int) -> bool:
        """Whether `s`'s prefill chunk of `n` tokens ends its prompt (its last row samples the first token)."""
        return s not in self.refill and s.prefilled + n == s.prompt_len

    def sampling(self) -> list[Sequence]:
        """Sequences that sample a token this step, in logits-row order."""
        done = [s for s, n in self.prefill if self.samples(s, n)]
        return [*self.decode, *done]


@dataclass
class Removals:
    """Requests scheduling took out of the queue or the batch: cancelled ones, and ones whose admission
    failed. The engine answers each of them."""
    cancelled: list[Request | Sequence] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)


class Scheduler:
    def __init__(self, cache: KVCache, max_batch: int, waiting: WaitingQueue, token_budget: int,
                 new_sequence: NewSequence, adapters: AdapterPlacement | None = None,
                 share: FairShare | None = None, preemption: Preemption | None = None,
                 prefix: PrefixLookup | None = None) -> None:
        self.cache = cache
        self.max_batch = min(max_batch, cache.max_batch)
        self.waiting = waiting
        self.token_budget = token_budget
        self.new_sequence = new_sequence
        self.adapters = adapters  # None: base model only, an adapter request fails
        self.share = share if share is not None else FairShare()  # admission order and per-tenant caps
        self.preemption = preemption  # None: nothing running is ever preempted
        self.prefix = prefix  # None: no prefix cache, nothing to wait for
        self.running: list[Sequence] = []
        # Preempted sequences (n = 1 requests), keeping their adapter pin, until they get a row back.
        self.preempted: dict[Request, Sequence] = {}
        self._lane_turn = 0

    def schedule(self, removals: Removals) -> StepPlan | None:
        self._reap(removals)
        urgent = self._admit(removals)
        if not self.running:
            return None
        if urgent:  # a starved tenant's first token does not wait behind a full batch's decode step
            lane = urgent[0].lane
            return StepPlan(lane, [], [(s, s.fill_len - s.prefilled) for s in urgent if s.lane == lane], urgent=True)
        lane = self._pick_lane()
        members = [s for s in self.running if s.lane == lane]
        decode = sorted((s for s in members if not s.prefilling and not s.awaiting_fork), key=lambda s: s.row)
        budget = max(self.token_budget - len(decode), self.token_budget // 4)
        prefill: list[tuple[Sequence, int]] = []
        for s in members:
            if budget <= 0:
                break
            if s.prefilling and not s.awaiting_fork:
                n = min(s.fill_len - s.prefilled, budget)
                prefill.append((s, n))
                budget -= n
        refill = {s: s.resume_ids for s, _ in prefill if s.resume_ids is not None}
        return StepPlan(lane, decode, prefill, refill)

    def would_preempt(self, request: Request) -> bool:
        """Any thread: whether `request` would preempt at a pass now (the batch is full, its tenant has nothing
        running, the preemption rule finds it victims). A guess on a snapshot: the batch may change first."""
        running = list(self.running)
        if self.preemption is None or len(running) < self.max_batch:
            return False
        if any(s.request.tenant == request.tenant for s in running):
            return False
        n = request.params.n
        return bool(self.preemption.victims(request.tenant, n, n, running, self.share.active))

    def ran(self, plan: StepPlan) -> None:
        """The step ran (one that was interrupted did not): its decode rows' tokens are charged."""
        self.share.served(plan.decode)

    def lanes_in_use(self) -> set[int | None]:
        """Lanes whose weights must not change: those of running and of preempted sequences (they resume there)."""
        return {s.lane for s in (*self.running, *self.preempted.values())}

    def finish(self, seq: Sequence) -> None:
        """Free the sequence's KV row (if it holds one) and adapter pin (idempotent)."""
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.row)
        elif self.preempted.get(seq.request) is seq:
            del self.preempted[seq.request]
        else:
            return
        last = not any(s.request is seq.request for s in self.running)  # n > 1: one pin for all n
        if last and seq.request.adapter_key is not None and self.adapters is not None:
            try:
                self.adapters.release(seq.request.adapter_key)
            except Exception:  # noqa: BLE001 - a manager bug must not take the batch down
                log.exception("adapter manager release(%r) failed", seq.request.adapter_key)

    def _reap(self, removals: Removals) -> None:
        for seq in [s for s in (*self.running, *self.preempted.values()) if s.request.cancelled]:
            self.finish(seq)
            removals.cancelled.append(seq)
        removals.cancelled.extend(self.waiting.take_cancelled())

    def _admit(self, removals: Removals) -> list[Sequence]:
        """Admit what fits; the new sequences that got their rows by preemption (their short prefills)."""
        urgent: list[Sequence] = []
        resumable = sorted(self.preempted, key=lambda r: r.arrival)  # each at the head of its tenant's queue
        admission = self.share.begin([*resumable, *self.waiting.snapshot()], self.running)
        while (request := admission.next()) is not None:
            seq = self.preempted.get(request)
            if seq is None and self._prefix_in_flight(request):
                continue  # a prompt with the same prefix is prefilling: start once its blocks are cached
            need = 1 if seq is not None else request.params.n  # n sequences: n KV rows, admitted together
            victims = self._victims(request.tenant, need)
            if victims is None:
                if self.preemption is None:
                    return urgent
                admission.skip(request.tenant)  # no room for it now; a tenant below its share may still preempt
                continue
            if seq is not None:
                self._preempt(victims, admission)
                self._resume(seq)
                admission.admitted(request, computed=0, rows=1)
                continue
            try:
                placement = self._place(request)
            except Exception as exc:  # noqa: BLE001 - the adapter manager refused: fail this request only
                self.waiting.discard(request)
                removals.failed.append((request, exc))
                continue
            if placement is None:
                continue  # adapter not resident yet: keep waiting, let others through
            self._preempt(victims, admission)
            slot, lane = placement
            rows = [self.cache.allocate() for _ in range(need)]
            assert None not in rows
            self.waiting.discard(request)
            first, *others = [self.new_sequence(request, row, slot, lane, i) for i, row in enumerate(rows)]
            for other in others:
                other.awaiting_fork = True
            first.forks = others
            self.running.extend([first, *others])
            admission.admitted(request, computed=first.prompt_len - first.cached)
            if victims and first.fill_len - first.prefilled <= self.token_budget // 4:
                urgent.append(first)
        return urgent

    def _prefix_in_flight(self, request: Request) -> bool:
        """Whether a running sequence still prefilling a prompt of the same namespace will cache more of
        `request`'s prompt than the cache holds now (identical prompts admitted together would all miss)."""
        if self.prefix is None:
            return False
        b = self.prefix.block_tokens
        prompt = request.prompt_ids
        usable = (len(prompt) - 1) // b * b  # what a cache hit can cover: the last token is always computed
        filling = [s for s in self.running if s.prefilling and s.resume_ids is None and not s.awaiting_fork]
        if not usable or not filling:
            return False
        key = request.adapter_key
        lane = self.adapters.lane_of(key) if key is not None and self.adapters is not None else None
        ns = namespace(key, lane is not None)
        cached: int | None = None
        for s in filling:
            if namespace(s.request.adapter_key, s.lane is not None) != ns:
                continue
            other = s.request.prompt_ids
            limit, shared = min(usable, len(other) // b * b), 0
            while shared < limit and prompt[shared:shared + b] == other[shared:shared + b]:
                shared += b
            if shared:
                cached = self.prefix.cached_tokens(ns, prompt) if cached is None else cached
                if shared > cached:
                    return True
        return False

    def _victims(self, tenant: str, need: int) -> list[Sequence] | None:
        """What must be preempted for `need` more rows: [] when they are free, None when they cannot be had."""
        short = max(len(self.running) + need - self.max_batch, need - self.cache.free_rows, 0)
        if not short:
            return []
        if self.preemption is None or need > self.max_batch:
            return None
        return self.preemption.victims(tenant, need, short, self.running, self.share.active) or None

    def _preempt(self, victims: list[Sequence], admission: AdmissionPass) -> None:
        for seq in victims:
            assert self.preemption is not None
            self.preemption.suspend(seq)  # while the row still holds what it computed
            self.running.remove(seq)
            self.cache.release(seq.row)
            seq.suspend()
            self.preempted[seq.request] = seq
            admission.preempted(seq)

    def _resume(self, seq: Sequence) -> None:
        assert self.preemption is not None
        row = self.cache.allocate()
        assert row is not None
        del self.preempted[seq.request]
        seq.row = row
        self.preemption.resume(seq)
        self.running.append(seq)

    def _place(self, request: Request) -> tuple[int, int | None] | None:
        key = request.adapter_key
        if key is None:
            return BASE_SLOT, None
        if self.adapters is None:
            raise NotFound("adapter not available: no adapter manager is attached")
        lane = self.adapters.lane_of(key)
        if lane is not None:  # a merged lane runs no adapter math: no device slot, the pin guards the version
            self.adapters.pin(key)
            return BASE_SLOT, lane
        slot = self.adapters.acquire(key)
        return None if slot is None else (int(slot), None)

    def _pick_lane(self) -> int | None:
        lanes = sorted({s.lane for s in self.running}, key=lambda lane: -1 if lane is None else lane)
        if len(lanes) == 1:
            return lanes[0]
        self._lane_turn = (self._lane_turn + 1) % len(lanes)
        return lanes[self._lane_turn]

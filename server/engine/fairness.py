"""Which waiting request joins the batch next: FIFO within a tenant, tenants ordered by a virtual token counter.

Why: one global FIFO lets one tenant's burst starve everyone queued behind it. The
virtual token counter (VTC, S-LoRA's "Fairness in Serving Large Language Models")
keeps per tenant the service it has received — prompt tokens plus `OUTPUT_COST` ×
generated tokens, divided by the tenant's weight — and when rows free up, the
waiting tenant with the least counter goes first, so tenants that keep the server
busy share it in proportion to their weights. A tenant that was idle is lifted to
the least counter of the active tenants when it returns: idling banks no credit.

With `fair=False` the order is plain arrival order (the counters are still kept,
for the metrics). Either way a tenant never holds more running sequences than its
`max_running` share; its other requests wait.

Thread-safety: engine thread only.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Protocol

from server.engine.request import Request
from server.engine.sequence import Sequence

PROMPT_COST = 1.0  # per computed prompt token, charged at admission (prefilled once for all n; cache hits free)
OUTPUT_COST = 2.0  # per generated token: each costs a step (the VTC paper's w_q = 2 w_p)


class TenantShares(Protocol):
    """What an admin set per tenant (server.api.quotas.TenantQuotas)."""

    def weight(self, tenant: str) -> float:
        """The tenant's share of service relative to others (> 0; 1 = equal)."""

    def max_running(self, tenant: str) -> int | None:
        """Most sequences of the tenant in the running batch at once; None = no cap."""


class EqualShares:
    """Every tenant weighs 1, none is capped: what an engine without a keys file gets."""

    def weight(self, tenant: str) -> float:
        return 1.0

    def max_running(self, tenant: str) -> int | None:
        return None


class ServiceSink(Protocol):
    """Where service counters go as they grow (server.metrics.Metrics)."""

    def observe_service(self, tenant: str, prompt_tokens: int, generated_tokens: int, counter: float) -> None: ...


class FairShare:
    def __init__(self, shares: TenantShares | None = None, fair: bool = True, sink: ServiceSink | None = None) -> None:
        self.shares = shares if shares is not None else EqualShares()
        self.fair = fair
        self.sink = sink
        self.counters: dict[str, float] = {}
        self._active: frozenset[str] = frozenset()
        self._floor = 0.0  # least counter of the last non-empty active set

    def begin(self, waiting: list[Request], running: list[Sequence]) -> AdmissionPass:
        """One admission pass over `waiting` (arrival order) beside the `running` batch."""
        self._activate({r.tenant for r in waiting} | {s.request.tenant for s in running})
        return AdmissionPass(self, waiting, Counter(s.request.tenant for s in running))

    def served(self, decoded: Iterable[Sequence]) -> None:
        """Charge one generated token to each sequence's tenant (a step's decode rows)."""
        tokens = Counter(s.request.tenant for s in decoded)
        for tenant, n in tokens.items():
            self._charge(tenant, 0, n)

    def charge_admission(self, request: Request, computed: int) -> None:
        """Charge an admitted request's computed prompt tokens to its tenant (prefix-cache hits cost nothing)."""
        self._charge(request.tenant, computed, 0)

    @property
    def active(self) -> frozenset[str]:
        """Tenants with running or waiting work at the last admission pass."""
        return self._active

    def _charge(self, tenant: str, prompt: int, generated: int) -> None:
        cost = prompt * PROMPT_COST + generated * OUTPUT_COST
        counter = self.counters.get(tenant, self._floor) + cost / self.shares.weight(tenant)
        self.counters[tenant] = counter
        if self.sink is not None:
            self.sink.observe_service(tenant, prompt, generated, counter)

    def _activate(self, active: set[str]) -> None:
        """Lift tenants that became active to the least counter of those already active (or, when none
        was, of the last ones that were): service they did not ask for is not owed to them later."""
        staying = [self.counters[t] for t in active & self._active if t in self.counters]
        floor = min(staying) if staying else self._floor
        for tenant in active - self._active:
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        if active:
            self._floor = min(self.counters[t] for t in active)
        self._active = frozenset(active)


class AdmissionPass:
    """The waiting requests of one scheduling pass, handed out in admission order.

    `next()` gives the request to try; the scheduler calls `admitted()` for each one it
    admits (which moves its tenant back in the order), and simply asks again for one
    that must keep waiting (its adapter is not resident yet).
    """

    def __init__(self, share: FairShare, waiting: list[Request], running: Counter[str]) -> None:
        self.share = share
        self.running = running  # sequences per tenant in the batch, updated as requests are admitted
        self.queues: dict[str, deque[Request]] = {}
        for request in waiting:
            self.queues.setdefault(request.tenant, deque()).append(request)

    def next(self) -> Request | None:
        while self.queues:
            tenant = self._pick()
            queue = self.queues[tenant]
            request = queue[0]
            cap = self.share.shares.max_running(tenant)
            if cap is not None and self.running[tenant] + request.params.n > cap:
                del self.queues[tenant]  # at its cap: the tenant's requests wait, in their order
                continue
            queue.popleft()
            if not queue:
                del self.queues[tenant]
            return request
        return None

    def admitted(self, request: Request, computed: int | None = None, rows: int | None = None) -> None:
        """`request` took `rows` rows (default its n) and will compute `computed` of its prompt tokens
        (default all: a resumed sequence passes 0, its recompute was the scheduler's choice)."""
        self.running[request.tenant] += request.params.n if rows is None else rows
        self.share.charge_admission(request, len(request.prompt_ids) if computed is None else computed)

    def skip(self, tenant: str) -> None:
        """None of `tenant`'s requests can run in this pass (no room, nothing fair to preempt)."""
        self.queues.pop(tenant, None)

    def preempted(self, seq: Sequence) -> None:
        """`seq` left the batch to make room; its tenant holds one row less."""
        self.running[seq.request.tenant] -= 1

    def _pick(self) -> str:
        if not self.share.fair:
            return min(self.queues, key=lambda t: self.queues[t][0].arrival)
        counters = self.share.counters
        return min(self.queues, key=lambda t: (counters.get(t, 0.0), self.queues[t][0].arrival))

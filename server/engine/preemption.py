"""Recompute-style preemption: which running sequences give their KV rows to an under-share tenant.

Why: fair admission alone only orders who gets the next row that frees. When one
tenant fills every row with long generations, a light tenant still waits for one
of them to end. So when fair admission picks a waiting request of a tenant below
its share of the batch and no row is free, the youngest running sequence of the
tenant furthest over its share is preempted: its row is freed, the sequence object
(sampling state, output so far) waits at the head of its tenant's queue, and when
it runs again it recomputes prompt + output (server/engine/sequence.py), which the
prefix cache shortens (the engine stores its blocks before the row is freed).

Shares are in rows: tenant t's share is `max_batch × weight(t) / Σ weights` over
the active tenants (running or waiting), at most its `max_running` cap.

No livelock: a request may preempt only for a tenant whose rows stay within its
share, only from a tenant that stays at or above its own share, and a sequence is
preempted at most `MAX_PREEMPTIONS` times. Never a victim: a sequence of a request
with n > 1 (its siblings share one prefill and fork state), or one whose prefill
is still being shared (`awaiting_fork`).

Thread-safety: engine thread only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from server.engine.fairness import TenantShares
from server.engine.sequence import Sequence

MAX_PREEMPTIONS = 2  # per sequence: then it runs to its end


RowHook = Callable[[Sequence], None]


class Preemption:
    def __init__(self, shares: TenantShares, max_batch: int, suspend: RowHook, resume: RowHook) -> None:
        """`suspend(seq)`: called before a victim's row is freed (keep what it computed); `resume(seq)`:
        after a preempted sequence got its new row (restore the row's state before it recomputes)."""
        self.shares = shares
        self.max_batch = max_batch
        self.suspend = suspend
        self.resume = resume

    def victims(self, tenant: str, need: int, rows: int, running: list[Sequence],
                active: Iterable[str]) -> list[Sequence]:
        """`rows` sequences to preempt so `tenant` can run `need` more, or [] when that is not fair.

        `running`: the batch; `active`: every tenant with running or waiting work."""
        held = Counter(s.request.tenant for s in running)
        share = self._shares(set(active) | {tenant})
        if held[tenant] + need > share[tenant]:
            return []  # the beneficiary would exceed its own share: it waits like everyone else
        picked: list[Sequence] = []
        for _ in range(rows):
            victim = self._victim(tenant, running, held, share, picked)
            if victim is None:
                return []
            picked.append(victim)
            held[victim.request.tenant] -= 1
        return picked

    def _victim(self, tenant: str, running: list[Sequence], held: Counter[str], share: dict[str, float],
                picked: list[Sequence]) -> Sequence | None:
        """The youngest preemptible sequence of the tenant furthest over its share (staying at or above it)."""
        over = [t for t in held if t != tenant and held[t] - 1 >= share.get(t, 0.0) and held[t] > 0]
        for victim_tenant in sorted(over, key=lambda t: -held[t] / max(share.get(t, 0.0), 1e-9)):
            candidates = [s for s in running if s.request.tenant == victim_tenant and s not in picked
                          and _preemptible(s)]
            if candidates:
                return max(candidates, key=lambda s: (s.request.arrival, -s.generated))
        return None

    def _shares(self, active: set[str]) -> dict[str, float]:
        total = sum(self.shares.weight(t) for t in active)
        out: dict[str, float] = {}
        for t in active:
            share = self.max_batch * self.shares.weight(t) / total
            cap = self.shares.max_running(t)
            out[t] = share if cap is None else min(share, cap)
        return out


def _preemptible(s: Sequence) -> bool:
    return (s.request.params.n == 1 and not s.awaiting_fork and not s.forks
            and s.preemptions < MAX_PREEMPTIONS and not s.request.cancelled)

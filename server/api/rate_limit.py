"""Per-tenant rate limits at submit: requests and tokens per minute (token buckets), queued requests.

Why a small bucket of our own and not the `limits` package: tokens are reserved
before generation (prompt + max new tokens × n) and the unused part is given
back when the request ends, which `limits` cannot do; and a bucket says exactly
when enough will have refilled, which is the honest `Retry-After`. The clock is
injected so tests need no sleeps.

A bucket holds up to one minute's allowance (the burst) and refills at
allowance / 60 per second. All keys of a tenant share its buckets.

Thread-safety: any thread (one lock).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from server.api.quotas import TenantQuota, TenantQuotas
from server.engine.request import Request
from server.errors import InvalidRequest, RateLimited
from server.metrics import Metrics

MIN_RETRY_AFTER_S = 1
QUEUE_RETRY_AFTER_S = 1  # a queue slot frees when some request of the tenant is admitted: not predictable


class TokenBucket:
    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # per second
        self.level = self.capacity
        self.stamp = now

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` can be taken (0 = now)."""
        self._refill(now)
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= cost

    def give_back(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)


@dataclass
class Ticket:
    """What one admitted request took from its tenant's buckets."""

    tenant: str
    tokens: int  # reserved from the tokens-per-minute bucket (0 when the tenant has none)


class TenantLimiter:
    def __init__(self, quotas: TenantQuotas | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quotas = quotas if quotas is not None else TenantQuotas()
        self.metrics = metrics
        self.clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._tickets: weakref.WeakKeyDictionary[Request, Ticket] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def admit(self, tenant: str, prompt_tokens: int, new_tokens: int, queued: Callable[[], int]) -> Ticket:
        """Take one request and its most tokens (`prompt_tokens` + `new_tokens`) from the tenant's buckets;
        `queued()` counts its requests waiting now (asked only when it has `max_queued`). RateLimited (429)
        naming the limit reached, and nothing taken."""
        quota = self.quotas.of(tenant)
        cost = prompt_tokens + new_tokens
        if quota.tokens_per_minute is not None and cost > quota.tokens_per_minute:
            raise InvalidRequest(f"this request may use {cost} tokens (prompt {prompt_tokens} + up to {new_tokens} "
                                 f"new), more than your tokens_per_minute limit ({quota.tokens_per_minute}); "
                                 "ask for fewer new tokens")
        if quota.max_queued is not None and (waiting := queued()) >= quota.max_queued:
            self._refuse(tenant, "max_queued", f"{waiting} of your requests are waiting (max_queued "
                         f"{quota.max_queued})", QUEUE_RETRY_AFTER_S)
        with self._lock:
            now = self.clock()
            requests, tokens = self._buckets(tenant, quota, now)
            waits = {"requests_per_minute": requests.wait(1, now) if requests else 0.0,
                     "tokens_per_minute": tokens.wait(cost, now) if tokens else 0.0}
            limit = max(waits, key=lambda k: waits[k])
            if waits[limit] > 0:
                retry = max(MIN_RETRY_AFTER_S, math.ceil(waits[limit]))
                self._refuse(tenant, limit, f"{limit} limit ({getattr(quota, limit)}) reached", retry)
            if requests:
                requests.take(1, now)
            if tokens:
                tokens.take(cost, now)
        return Ticket(tenant, cost if tokens else 0)

    def hold(self, request: Request, ticket: Ticket) -> None:
        """Remember what `request` took until `release` (forgotten with the request if never released)."""
        with self._lock:
            self._tickets[request] = ticket

    def release(self, request: Request, used_tokens: int) -> None:
        """The request ended having used `used_tokens`: give the rest of its reservation back."""
        with self._lock:
            ticket = self._tickets.pop(request, None)
            bucket = self._tokens.get(ticket.tenant) if ticket is not None else None
            if ticket is not None and bucket is not None:
                bucket.give_back(max(0, ticket.tokens - used_tokens), self.clock())

    def cancel(self, ticket: Ticket) -> None:
        """The request was refused after `admit` (queue full, draining): give everything back."""
        with self._lock:
            now = self.clock()
            if ticket.tenant in self._requests:
                self._requests[ticket.tenant].give_back(1, now)
            if ticket.tenant in self._tokens:
                self._tokens[ticket.tenant].give_back(ticket.tokens, now)

    def _buckets(self, tenant: str, quota: TenantQuota, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        if quota.requests_per_minute is not None and tenant not in self._requests:
            self._requests[tenant] = TokenBucket(quota.requests_per_minute, now)
        if quota.tokens_per_minute is not None and tenant not in self._tokens:
            self._tokens[tenant] = TokenBucket(quota.tokens_per_minute, now)
        return self._requests.get(tenant), self._tokens.get(tenant)

    def _refuse(self, tenant: str, limit: str, why: str, retry_after: int) -> None:
        if self.metrics is not None:
            self.metrics.tenant_rate_limited.labels(tenant, limit).inc()
            self.metrics.requests_rejected.labels("tenant_limit").inc()
        raise RateLimited(f"rate limit: {why}; retry after {retry_after} s", limit, retry_after)

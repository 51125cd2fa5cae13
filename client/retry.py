"""When to retry and how long to wait: exponential backoff with full jitter.

Only answers that mean "not now" are retried (429 queue full, 503 not ready or
draining), plus network failures. Any other 4xx is the caller's mistake and
retrying it would only repeat the mistake, so it is raised at once.
A request that may have reached the server (the connection broke after
sending) is resent only when that is safe: idempotent methods, or a request
carrying an `Idempotency-Key`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# Raised before a single byte of the request left this machine: always safe to resend.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass
class RetryPolicy:
    max_attempts: int = 4          # total tries, the first included
    backoff_base: float = 0.5      # seconds; attempt n waits up to base * 2**(n-1)
    backoff_max: float = 8.0       # cap of one computed backoff
    retry_after_max: float = 60.0  # never sleep longer than this on a server hint
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoff(self, attempt: int) -> float:
        """Full jitter (AWS style): uniform in [0, min(max, base * 2**(attempt-1))]."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return self.rng.uniform(0, ceiling)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Honour the server's Retry-After when it gives one, else back off."""
        if retry_after is not None:
            return min(self.retry_after_max, retry_after) + self.rng.uniform(0, 0.1 * max(retry_after, 0.1))
        return self.backoff(attempt)

    def retry_status(self, status: int, attempt: int) -> bool:
        return status in RETRY_STATUSES and attempt < self.max_attempts

    def retry_transport(self, exc: Exception, may_resend: bool, attempt: int) -> bool:
        """`may_resend`: the request is safe to repeat even if the server already saw it."""
        if attempt >= self.max_attempts or not isinstance(exc, httpx.TransportError):
            return False
        return may_resend or isinstance(exc, NOT_SENT_ERRORS)


NO_RETRY = RetryPolicy(max_attempts=1)

"""Per-tenant token buckets: bursts, refill, honest Retry-After, refunds, queued requests (an injected clock)."""

from __future__ import annotations

import asyncio

import pytest

from server.api.quotas import TenantQuota, TenantQuotas
from server.api.rate_limit import TenantLimiter, TokenBucket
from server.engine.request import Request, RequestStream, SamplingParams
from server.errors import InvalidRequest, RateLimited
from server.metrics import Metrics


def nothing_queued() -> int:
    return 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, metrics: Metrics | None = None, **quota) -> TenantLimiter:
    return TenantLimiter(TenantQuotas({"a": TenantQuota(**quota)}), metrics, clock)


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(60, now=0.0)  # 60 / minute = 1 / s
    bucket.take(60, 0.0)
    assert bucket.wait(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait(10, 4.0) == pytest.approx(6.0)
    assert bucket.wait(60, 1000.0) == 0.0
    bucket.give_back(500, 1000.0)
    assert bucket.level == 60  # never above a minute's allowance


def test_requests_per_minute_refuses_with_the_seconds_until_refill() -> None:
    clock = Clock()
    metrics = Metrics()
    lim = limiter(clock, metrics, requests_per_minute=2)
    lim.admit("a", 1, 1, nothing_queued)
    lim.admit("a", 1, 1, nothing_queued)
    with pytest.raises(RateLimited) as refused:
        lim.admit("a", 1, 1, nothing_queued)
    assert refused.value.status == 429 and refused.value.limit == "requests_per_minute"
    assert refused.value.headers == {"Retry-After": "30"}  # one request refills in 60 / 2 s
    clock.now += 29.9
    with pytest.raises(RateLimited) as again:
        lim.admit("a", 1, 1, nothing_queued)
    assert again.value.headers == {"Retry-After": "1"}
    clock.now += 0.1
    lim.admit("a", 1, 1, nothing_queued)
    assert metrics.tenant_rate_limited.labels("a", "requests_per_minute")._value.get() == 2


def test_other_tenants_and_unlisted_tenants_are_not_limited() -> None:
    lim = limiter(Clock(), requests_per_minute=1)
    lim.admit("a", 1, 1, nothing_queued)
    with pytest.raises(RateLimited):
        lim.admit("a", 1, 1, nothing_queued)
    for _ in range(100):
        lim.admit("b", 1, 1, nothing_queued)


def test_tokens_are_reserved_then_the_unused_part_refunded(loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    lim = limiter(clock, tokens_per_minute=600)  # 10 tokens / s
    tickets = [lim.admit("a", 100, 100, nothing_queued) for _ in range(3)]  # 3 × 200 reserved: empty
    with pytest.raises(RateLimited) as refused:
        lim.admit("a", 10, 40, nothing_queued)
    assert refused.value.limit == "tokens_per_minute" and refused.value.headers["Retry-After"] == "5"
    req = request(loop)
    lim.hold(req, tickets[0])
    lim.release(req, used_tokens=110)  # 90 of its 200 come back
    lim.admit("a", 10, 40, nothing_queued)  # 50 ≤ 90
    lim.release(req, used_tokens=0)  # a second release gives nothing more
    with pytest.raises(RateLimited):
        lim.admit("a", 10, 40, nothing_queued)


def test_a_request_larger_than_a_minute_of_tokens_is_a_clear_4xx_not_a_429() -> None:
    lim = limiter(Clock(), tokens_per_minute=100)
    with pytest.raises(InvalidRequest, match="tokens_per_minute"):
        lim.admit("a", 50, 51, nothing_queued)


def test_cancel_gives_everything_back() -> None:
    lim = limiter(Clock(), requests_per_minute=1, tokens_per_minute=100)
    ticket = lim.admit("a", 50, 50, nothing_queued)
    lim.cancel(ticket)
    lim.admit("a", 50, 50, nothing_queued)


def test_max_queued_refuses_and_takes_nothing() -> None:
    lim = limiter(Clock(), requests_per_minute=1, max_queued=2)
    with pytest.raises(RateLimited) as refused:
        lim.admit("a", 1, 1, queued=lambda: 2)
    assert refused.value.limit == "max_queued" and refused.value.headers == {"Retry-After": "1"}
    lim.admit("a", 1, 1, queued=lambda: 1)  # the refused one took no request from the bucket


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def request(loop: asyncio.AbstractEventLoop) -> Request:
    async def make() -> Request:
        return Request([1], SamplingParams(), RequestStream(), tenant="a")
    return loop.run_until_complete(make())

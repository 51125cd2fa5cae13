"""Retry, backoff and error mapping of the SDK, with httpx.MockTransport as the server.

No model is involved here: these are the HTTP-level rules (what is retried,
what never is, how long we wait). Everything about generation itself is tested
against a real server in test_sdk_server.py.
"""

from __future__ import annotations

import json
import random

import httpx
import pytest

from client import (
    AsyncClient,
    AuthError,
    Client,
    ConflictError,
    ConnectionFailedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    UnavailableError,
    ValidationError,
)
from client.errors import parse_retry_after


def error(status: int, message: str, type_: str = "x", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": message}}, headers=headers)


class Script:
    """Answers requests from a list, recording each request; a list item may be an exception."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeSleep:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[float] = []
        monkeypatch.setattr("client.transport.time.sleep", self.calls.append)


def make_client(script: Script, attempts: int = 4) -> Client:
    policy = RetryPolicy(max_attempts=attempts, rng=random.Random(0))
    return Client("http://test", "k", retry=policy, transport=httpx.MockTransport(script))


GOOD = {"id": "g1", "adapter_id": None, "text": "hi", "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


@pytest.mark.parametrize("status,cls", [
    (400, ValidationError), (422, ValidationError), (401, AuthError), (404, NotFoundError), (409, ConflictError),
    (413, PayloadTooLargeError), (431, PayloadTooLargeError), (500, ServerError),
])
def test_4xx_5xx_map_to_typed_errors_and_are_never_retried(monkeypatch, status: int, cls: type) -> None:
    sleep = FakeSleep(monkeypatch)
    script = Script(error(status, f"server says {status}", "some_type"), httpx.Response(200, json=GOOD))
    with make_client(script) as c, pytest.raises(cls) as info:
        c.generate("x")
    assert info.value.message == f"server says {status}"
    assert info.value.status == status and info.value.type == "some_type"
    assert len(script.requests) == 1 and sleep.calls == []


def test_429_and_503_are_retried_honouring_retry_after(monkeypatch) -> None:
    sleep = FakeSleep(monkeypatch)
    script = Script(error(429, "queue full", headers={"Retry-After": "2"}),
                    error(503, "warming up", headers={"Retry-After": "1"}),
                    httpx.Response(200, json=GOOD))
    with make_client(script) as c:
        result = c.generate("x")
    assert result.text == "hi" and result.usage.total_tokens == 5
    assert len(script.requests) == 3
    assert 2.0 <= sleep.calls[0] <= 2.2 and 1.0 <= sleep.calls[1] <= 1.1


def test_retries_are_bounded_and_the_last_error_surfaces(monkeypatch) -> None:
    sleep = FakeSleep(monkeypatch)
    script = Script(*[error(429, "still full") for _ in range(3)])
    with make_client(script, attempts=3) as c, pytest.raises(RateLimitError, match="still full"):
        c.generate("x")
    assert len(script.requests) == 3 and len(sleep.calls) == 2


def test_backoff_without_retry_after_is_exponential_with_jitter() -> None:
    policy = RetryPolicy(backoff_base=0.5, backoff_max=4.0, rng=random.Random(1))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (8, 4.0)]:
        samples = [policy.backoff(attempt) for _ in range(200)]
        assert 0 <= min(samples) and max(samples) <= ceiling
        assert max(samples) > ceiling * 0.8  # jitter spreads over the whole window
    assert policy.delay(1, 120.0) <= 60.0 + 12.0  # a server hint is capped


def test_connection_errors_are_retried_then_typed(monkeypatch) -> None:
    FakeSleep(monkeypatch)
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json=GOOD))
    with make_client(script) as c:
        assert c.generate("x").text == "hi"
    script = Script(*[httpx.ConnectError("refused")] * 2)
    with make_client(script, attempts=2) as c, pytest.raises(ConnectionFailedError, match="refused"):
        c.generate("x")


def test_a_post_that_may_have_been_seen_is_not_resent_without_an_idempotency_key(monkeypatch) -> None:
    FakeSleep(monkeypatch)
    script = Script(httpx.ReadError("reset"), httpx.Response(200, json=GOOD))
    with make_client(script) as c, pytest.raises(ConnectionFailedError):
        c.generate("x")  # generate is not idempotent: the server may already be running it
    assert len(script.requests) == 1
    job = {"id": "j1", "status": "queued", "adapter_id": "a", "progress": {"step": 0, "steps": 5}}
    script = Script(httpx.ReadError("reset"), httpx.Response(202, json=job))
    with make_client(script) as c:
        assert c.submit_training("a", [{"prompt": "p", "completion": "c"}], idempotency_key="K1").id == "j1"
    assert [r.headers["Idempotency-Key"] for r in script.requests] == ["K1", "K1"]


def test_submit_always_sends_an_idempotency_key_and_the_api_key(monkeypatch) -> None:
    job = {"id": "j1", "status": "queued", "adapter_id": "a", "progress": {"step": 0, "steps": 5}}
    script = Script(httpx.Response(202, json=job))
    with make_client(script) as c:
        c.submit_training("a", [{"prompt": "p", "completion": "c"}], rank=4, steps=5)
    req = script.requests[0]
    assert req.headers["Idempotency-Key"] and req.headers["Authorization"] == "Bearer k"
    body = json.loads(req.content)
    assert body == {"adapter_id": "a", "method": "lora", "rank": 4, "steps": 5,
                    "data": [{"prompt": "p", "completion": "c"}]}


def test_env_twins_give_url_and_key(monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_URL", "http://env-host:1234/")
    monkeypatch.setenv("LORAPLEX_API_KEY", "env-key")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    with Client(transport=httpx.MockTransport(handler)) as c:
        c.health()
    assert str(seen[0].url) == "http://env-host:1234/health"
    assert seen[0].headers["Authorization"] == "Bearer env-key"


def test_ready_is_false_on_503_without_retrying(monkeypatch) -> None:
    sleep = FakeSleep(monkeypatch)
    script = Script(error(503, "loading", headers={"Retry-After": "5"}))
    with make_client(script) as c:
        assert c.ready() is False
    assert sleep.calls == []


def test_dot_ids_are_escaped_in_paths() -> None:
    script = Script(error(422, "bad id"))
    with make_client(script) as c, pytest.raises(ValidationError):
        c.get_adapter("..")
    assert script.requests[0].url.raw_path == b"/v1/adapters/%2E%2E"


def test_non_json_error_body_still_gives_a_message() -> None:
    script = Script(httpx.Response(502, text="Bad gateway from proxy"))
    with make_client(script) as c, pytest.raises(ServerError, match="Bad gateway from proxy"):
        c.health()


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("3") == 3.0 and parse_retry_after("junk") is None


async def test_async_client_shares_the_retry_rules(monkeypatch) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("client.transport.asyncio.sleep", fake_sleep)
    answers = [error(503, "draining", headers={"Retry-After": "1"}), httpx.Response(200, json=GOOD)]
    policy = RetryPolicy(rng=random.Random(0))
    async with AsyncClient("http://test", retry=policy,
                           transport=httpx.MockTransport(lambda r: answers.pop(0))) as c:
        assert (await c.generate("x")).text == "hi"
    assert len(slept) == 1 and 1.0 <= slept[0] <= 1.1
    answers = [error(404, "no adapter 'nope'", "not_found")]
    async with AsyncClient("http://test", transport=httpx.MockTransport(lambda r: answers.pop(0))) as c:
        with pytest.raises(NotFoundError, match="no adapter 'nope'"):
            await c.generate("x", adapter_id="nope")


def test_unavailable_error_carries_retry_after(monkeypatch) -> None:
    FakeSleep(monkeypatch)
    script = Script(*[error(503, "draining", headers={"Retry-After": "7"})] * 2)
    with make_client(script, attempts=2) as c, pytest.raises(UnavailableError) as info:
        c.health()
    assert info.value.retry_after == 7.0

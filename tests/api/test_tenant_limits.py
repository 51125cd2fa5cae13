"""Per-tenant limits over real HTTP: 429 + Retry-After for the tenant over its limit only, on every
generation route (streams refused before they start), and each tenant's metrics in its own view only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import app_of, cpu_settings, running_server

KEYS = {
    "keys": {
        "alice-key-0001": {"tenant": "alice"},
        "alice-key-0002": {"tenant": "alice"},
        "bob-key-000001": {"tenant": "bob"},
        "dave-key-00001": {"tenant": "dave"},
        "erin-key-00001": {"tenant": "erin"},
        "root-key-00001": {"tenant": "ops", "admin": True},
    },
    "tenants": {
        "alice": {"requests_per_minute": 2},
        "dave": {"tokens_per_minute": 120},
        "erin": {"max_concurrent": 1, "max_queued": 1},
    },
}
SHORT = {"prompt": "Hello there", "max_new_tokens": 2}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tenant-limits")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps(KEYS))
    keys.chmod(0o600)
    with running_server(cpu_settings(tiny_model_dir, tmp / "store", api_keys=keys)) as base_url:
        yield base_url


def refused(r: httpx.Response, limit: str) -> int:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and limit in error["message"], error
    return int(r.headers["Retry-After"])


def test_over_requests_per_minute_is_429_for_that_tenant_only(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/generate", json=SHORT, headers=auth("alice-key-0001")).status_code == 200
        assert c.post("/v1/completions", json={"model": _base_model(c), **_openai(SHORT)},
                      headers=auth("alice-key-0002")).status_code == 200  # any key of alice's counts
        routes = [("/generate", SHORT), ("/generate", {**SHORT, "stream": True}),
                  ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}),
                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})]
        for path, body in routes:
            if path.startswith("/v1"):
                body = {"model": _base_model(c), **body}
            r = c.post(path, json=body, headers=auth("alice-key-0002"))
            retry = refused(r, "requests_per_minute")
            assert 1 <= retry <= 30  # one request refills in 60 / 2 s
            assert r.headers["content-type"].startswith("application/json")  # no stream was started
            if path.startswith("/v1"):
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        for _ in range(3):  # bob is unaffected
            assert c.post("/generate", json=SHORT, headers=auth("bob-key-000001")).status_code == 200


def test_tokens_per_minute_reserves_and_refunds(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 200}, headers=auth("dave-key-00001"))
        assert r.status_code == 422 and "tokens_per_minute" in r.json()["error"]["message"]
        body = {"prompt": "Hi", "max_new_tokens": 50, "stop_token_ids": [], "ignore_eos": True}
        assert c.post("/generate", json=body, headers=auth("dave-key-00001")).status_code == 200
        assert c.post("/generate", json=body, headers=auth("dave-key-00001")).status_code == 200
        retry = refused(c.post("/generate", json=body, headers=auth("dave-key-00001")), "tokens_per_minute")
        assert 1 <= retry <= 26  # ~52 tokens short at 2 tokens / s
        assert c.post("/generate", json=body, headers=auth("bob-key-000001")).status_code == 200


def test_max_concurrent_queues_and_max_queued_refuses(url: str) -> None:
    """erin may run 1 sequence and queue 1 request: a second waits (while bob is served), a third is a 429."""
    long = {"prompt": "Hi", "max_new_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/generate", json=long, headers=auth("erin-key-00001")) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
            next(lines)  # its first token: it holds erin's one row
            with c.stream("POST", "/generate", json=long, headers=auth("erin-key-00001")) as queued:
                assert queued.status_code == 200
                r = c.post("/generate", json=SHORT, headers=auth("erin-key-00001"))
                assert refused(r, "max_queued") == 1
                assert _queue_depth(c) == 1  # capped: waits although the batch has room
                assert c.post("/generate", json=SHORT, headers=auth("bob-key-000001")).status_code == 200


def _queue_depth(c: httpx.Client) -> float:
    text = c.get("/metrics", headers=auth("root-key-00001")).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("loraplex_queue_depth ")))


def test_each_tenant_sees_only_its_own_limit_and_service_series(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        c.post("/generate", json=SHORT, headers=auth("bob-key-000001"))
        for _ in range(3):
            c.post("/generate", json=SHORT, headers=auth("alice-key-0001"))
        alice = c.get("/metrics", headers=auth("alice-key-0001")).text
        bob = c.get("/metrics", headers=auth("bob-key-000001")).text
        admin = c.get("/metrics", headers=auth("root-key-00001")).text
    limited = 'loraplex_tenant_rate_limited_total{limit="requests_per_minute",tenant="alice"}'
    assert limited in alice and limited in admin and limited not in bob
    assert 'loraplex_tenant_service_tokens_total{phase="prompt",tenant="bob"}' in bob
    assert 'tenant="alice"' not in bob and 'tenant="bob"' not in alice
    assert 'loraplex_tenant_virtual_tokens{tenant="bob"}' in admin


def _openai(body: dict) -> dict:
    return {"prompt": body["prompt"], "max_tokens": body["max_new_tokens"]}


def _base_model(c: httpx.Client) -> str:
    return c.get("/v1/models", headers=auth("bob-key-000001")).json()["data"][0]["id"]


def test_preemptions_are_counted_for_admins_only(url: str) -> None:
    """A tenant's preemption count measures other tenants' demand: not in its own view."""
    app_of(url).state.services.metrics.observe_preemption("bob")
    with httpx.Client(base_url=url, timeout=60) as c:
        bob = c.get("/metrics", headers=auth("bob-key-000001")).text
        admin = c.get("/metrics", headers=auth("root-key-00001")).text
    assert 'loraplex_tenant_preemptions_total{tenant="bob"} 1.0' in admin
    assert "preemptions" not in bob and 'tenant="bob"' in bob

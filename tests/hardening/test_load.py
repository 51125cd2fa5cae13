"""Load: bursts past the queue get immediate 429s and admitted work is untouched; mass disconnects leak nothing.

Leak checks read the engine's and the adapter manager's own counters (rows,
pins, loads in flight) and count live engine `Request` objects, so they do
not depend on timing. The 10-minute soak is in test_soak.py (`long`).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.hardening.conftest import hardening_settings
from tests.hardening.helpers import (assert_engine_clean, assert_serving, live_engine_requests, metric_value,
                                     scrape, services_of)
from tests.harness import gate_engine, raw_socket_post, running_server, wait_until

MAX_BATCH, MAX_QUEUE = 2, 4
PROMPTS = [f"Request number {i}: tell me about the sea" for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("load") / "store"
    settings = hardening_settings(tiny_model_dir, store, max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def baseline(server: str) -> dict[str, str]:
    """Each prompt's greedy text when it runs alone: what admitted requests must still produce."""
    return {p: httpx.post(f"{server}/generate", json={"prompt": p, "max_new_tokens": 8}, timeout=60).json()["text"]
            for p in PROMPTS}


def _post(url: str, prompt: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    r = httpx.post(f"{url}/generate", json={"prompt": prompt, "max_new_tokens": 8}, timeout=120)
    return r, time.perf_counter() - started


def test_burst_past_the_queue_gets_immediate_429s_and_admitted_requests_are_untouched(server, baseline):
    services = services_of(server)
    rejected_before = metric_value(scrape(server), "loraplex_requests_rejected_total", reason="queue_full")
    n = 8 * (MAX_BATCH + MAX_QUEUE)  # several times what the server can hold
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: (PROMPTS[i % len(PROMPTS)], *_post(server, PROMPTS[i % len(PROMPTS)])),
                                range(n)))
    ok = [(p, r, s) for p, r, s in results if r.status_code == 200]
    refused = [(p, r, s) for p, r, s in results if r.status_code == 429]
    assert len(ok) + len(refused) == n, [r.status_code for _, r, _ in results]
    assert refused and len(ok) >= MAX_BATCH + MAX_QUEUE, (len(ok), len(refused))
    for _, r, seconds in refused:
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_exceeded"
        assert seconds < 2.0, seconds  # refused at once, not after waiting behind the queue
    for prompt, r, _ in ok:  # greedy: an admitted request's text does not depend on the crowd
        assert r.json()["text"] == baseline[prompt]
    rejected_after = metric_value(scrape(server), "loraplex_requests_rejected_total", reason="queue_full")
    assert rejected_after - rejected_before == len(refused)
    assert_engine_clean(services)


def test_parked_engine_admits_exactly_the_queue_and_refuses_the_rest(server, baseline):
    """Deterministic variant: with the engine parked, exactly max_queue requests wait; every other is a 429."""
    engine = services_of(server).engine
    gate = gate_engine(engine)
    try:
        gate.arm()
        assert gate.entered.wait(10)
        with ThreadPoolExecutor(MAX_QUEUE) as pool:
            admitted = [pool.submit(_post, server, PROMPTS[i]) for i in range(MAX_QUEUE)]
            assert wait_until(lambda: engine.stats()["waiting"] == MAX_QUEUE)
            extra = [_post(server, PROMPTS[0]) for _ in range(3 * MAX_QUEUE)]
            assert all(r.status_code == 429 and s < 2.0 for r, s in extra), [(r.status_code, s) for r, s in extra]
            gate.release()
            for i, fut in enumerate(admitted):
                r, _ = fut.result(120)
                assert r.status_code == 200 and r.json()["text"] == baseline[PROMPTS[i]]
    finally:
        gate.release()
    assert_engine_clean(services_of(server))


@pytest.fixture(scope="module")
def wide_server(tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("disconnect") / "store"
    settings = hardening_settings(tiny_model_dir, store, max_batch=8, max_queue=128)
    with running_server(settings) as url:
        yield url


def _read_until(sock: socket.socket, marker: bytes, limit: float = 60.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_100_streaming_clients_that_vanish_leave_nothing_behind(wide_server, put_adapter):
    url = wide_server
    services = services_of(url)
    assert put_adapter(url, "vanish-a", "lora_qv").status_code == 201
    assert put_adapter(url, "vanish-b", "miss_balance").status_code == 201
    before = {r: metric_value(scrape(url), "loraplex_requests_total", route="generate", finish_reason=r)
              for r in ("cancelled", "length", "stop")}
    sockets: list[socket.socket] = []
    for i in range(100):
        body = {"prompt": f"client {i} says hello", "max_new_tokens": 60, "stream": True,
                "adapter_id": [None, "vanish-a", "vanish-b"][i % 3]}
        sockets.append(raw_socket_post(url, "/generate", body))

    def vanish(i: int, sock: socket.socket) -> None:
        # A third leave after the headers, the rest once tokens are flowing.
        _read_until(sock, b"\r\n\r\n" if i % 3 == 0 else b"data: {\"text\"")
        sock.close()

    threads = [threading.Thread(target=vanish, args=(i, s)) for i, s in enumerate(sockets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert_engine_clean(services, timeout=60)
    after = {r: metric_value(scrape(url), "loraplex_requests_total", route="generate", finish_reason=r)
             for r in before}
    ended = sum(after[r] - before[r] for r in before)
    assert ended == 100 and after["cancelled"] - before["cancelled"] >= 90, (before, after)
    assert metric_value(scrape(url), "loraplex_adapter_pins") == 0
    assert metric_value(scrape(url), "loraplex_kv_rows_free") == 8
    assert wait_until(lambda: live_engine_requests() == 0, 10), live_engine_requests()
    assert_serving(url, adapter_id="vanish-a")
    assert_serving(url, adapter_id="vanish-b")

"""POST /generate over real HTTP (uvicorn on loopback): JSON, SSE, limits, cancellation."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from server.settings import Settings
from tests.harness import gate_engine, raw_socket_post, running_server, wait_until


@pytest.fixture(scope="module")
def server(varied_model_dir, tmp_path_factory):
    settings = Settings(model=str(varied_model_dir), store=tmp_path_factory.mktemp("store"), device="cpu",
                        dtype="float32", max_batch=4, max_queue=2, max_new_tokens_limit=500,
                        train_interleave_steps=1)
    with running_server(settings) as url:
        yield url


def services_of(url: str):
    from tests.harness import app_of

    return app_of(url).state.services


def sse_events(response: httpx.Response) -> list:
    """Parse an SSE body strictly: only `data:` lines, each event ended by a blank line."""
    events, buf = [], []
    for line in response.iter_lines():
        if line == "":
            if buf:
                events.append("\n".join(buf))
                buf = []
            continue
        assert line.startswith("data: "), line
        buf.append(line[len("data: "):])
    assert not buf, "unterminated event"
    return events


def test_generate_json(server):
    r = httpx.post(f"{server}/generate", json={"prompt": "Hello world", "max_new_tokens": 12}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"id", "adapter_id", "text", "finish_reason", "usage"}
    assert body["finish_reason"] == "length" and body["adapter_id"] is None
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["prompt_tokens"] >= 2
    again = httpx.post(f"{server}/generate", json={"prompt": "Hello world", "max_new_tokens": 12}, timeout=60)
    assert again.json()["text"] == body["text"]  # greedy is deterministic


def test_sse_is_well_formed_and_matches_the_plain_text(server):
    payload = {"prompt": "The capital of France is", "max_new_tokens": 20}
    plain = httpx.post(f"{server}/generate", json=payload, timeout=60).json()
    with httpx.stream("POST", f"{server}/generate", json={**payload, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    decoded = [json.loads(e) for e in events[:-1]]
    deltas, final = decoded[:-1], decoded[-1]
    assert all(set(d) == {"text"} and d["text"] for d in deltas)
    assert len(deltas) > 1
    assert "".join(d["text"] for d in deltas) == plain["text"]
    assert final["finish_reason"] == plain["finish_reason"] and final["usage"] == plain["usage"]


def test_stop_strings_cut_the_text(server):
    base = httpx.post(f"{server}/generate", json={"prompt": "Once upon a time", "max_new_tokens": 24},
                      timeout=60).json()["text"]
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip()
    cut = httpx.post(f"{server}/generate", json={"prompt": "Once upon a time", "max_new_tokens": 24,
                                                 "stop": [stop]}, timeout=60).json()
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == base[:base.index(stop)]
    with httpx.stream("POST", f"{server}/generate", json={"prompt": "Once upon a time", "max_new_tokens": 24,
                                                          "stop": stop, "stream": True}, timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r)[:-1]]
    assert "".join(e.get("text", "") for e in events) == cut["text"]


def test_seeded_sampling_is_reproducible(server):
    payload = {"prompt": "Tell me", "max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a = httpx.post(f"{server}/generate", json=payload, timeout=60).json()["text"]
    b = httpx.post(f"{server}/generate", json=payload, timeout=60).json()["text"]
    c = httpx.post(f"{server}/generate", json={**payload, "seed": 8}, timeout=60).json()["text"]
    assert a == b and a != c


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": -5}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 10**9}, "max_new_tokens"),
    ({"prompt": "x " * 600, "max_new_tokens": 10}, "max_new_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": ["a"] * 100}, "stop"),
    ({"prompt": "x", "stop": ["a" * 10_000]}, "stop"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "stream": "maybe"}, "stream"),
])
def test_bad_input_is_a_clean_422_naming_the_field(server, body, field):
    r = httpx.post(f"{server}/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert field in error["message"] and error["type"]


def test_nan_temperature_and_broken_json_are_422(server):
    for raw in (b'{"prompt": "x", "temperature": NaN}', b'{"prompt": ', b"[1, 2]"):
        r = httpx.post(f"{server}/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "error" in r.json()


def test_unknown_adapter_is_404(server):
    r = httpx.post(f"{server}/generate", json={"prompt": "x", "adapter_id": "no-such-adapter"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_base_model_id_as_adapter_is_the_base(server, varied_model_dir):
    r = httpx.post(f"{server}/generate", json={"prompt": "Hi", "adapter_id": varied_model_dir.name, "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["adapter_id"] == varied_model_dir.name


def test_body_and_header_limits(server):
    big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    r = httpx.post(f"{server}/generate", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks():
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{server}/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    r = httpx.post(f"{server}/generate", json={"prompt": "x"}, headers={"x-pad": "a" * 20_000})
    assert r.status_code == 431


def test_queue_full_is_429_with_retry_after(server):
    services = services_of(server)
    gate = gate_engine(services.engine)
    results: list[httpx.Response] = []
    try:
        gate.arm()
        assert gate.entered.wait(10)  # engine parked: submitted requests stay queued
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{server}/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=60)))
            for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: services.engine.stats()["waiting"] == 2)
        r = httpx.post(f"{server}/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=30)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["message"]
    finally:
        gate.release()
    for t in threads:
        t.join(60)
    assert [x.status_code for x in results] == [200, 200]


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_client_disconnect_cancels_and_frees_the_slot(server, stream):
    services = services_of(server)
    engine = services.engine
    gate = gate_engine(engine)
    cancelled_before = _cancelled_count(services)
    try:
        sock = raw_socket_post(server, "/generate", {"prompt": "Hello", "max_new_tokens": 450, "stream": stream})
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # headers (and maybe a first event) arrived
        assert wait_until(lambda: engine.stats()["running"] == 1 and engine.stats()["tokens_generated"] > 0)
        gate.arm()
        assert gate.entered.wait(10)  # the request is parked in the batch, mid-generation
        assert engine.stats()["running"] == 1
        sock.close()  # the client goes away
        assert wait_until(lambda: engine.scheduler.running and engine.scheduler.running[0].request.cancelled)
        gate.release()
        assert wait_until(lambda: engine.stats()["running"] == 0)
        assert engine.stats()["free_kv_rows"] == engine.stats()["max_batch"]
        assert wait_until(lambda: _cancelled_count(services) == cancelled_before + 1)
    finally:
        gate.release()


def _cancelled_count(services) -> float:
    return services.metrics.requests.labels("generate", "cancelled")._value.get()

"""Uploaded adapters are served: upload → generate equals the same files placed on disk; versions under load.

Needs the engine with the adapter manager wired in (server/app.py build_services).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.adapters.types import AdapterKey
from server.app import create_app
from tests.api.adapter_http import ADMIN, ALICE, BOB, auth, build_adapter, load_tiny, upload, write_keys
from tests.harness import Gate, app_of, cpu_settings, gate_engine, running_server, wait_until

KINDS = ["lora_qv", "lora_all", "lora_embed", "miss_balance", "miss_mini", "miss_bat", "bone"]
SCALE = {"miss_mini": 4.0}  # mini repeats a small block: it needs larger values to move greedy tokens
PROMPT = "The quick brown fox jumps over the lazy dog and then"


@pytest.fixture(scope="module")
def peft_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("peft-serving")
    base = load_tiny(tiny_model_dir)
    # Large random weights: the tiny random model's greedy output must visibly change.
    made = {kind: build_adapter(base, kind, out / kind, seed=1, scale=SCALE.get(kind, 1.0)) for kind in KINDS}
    made["lora_v2"] = build_adapter(base, "lora_all", out / "lora_v2", seed=7, scale=1.0)
    return made


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, peft_dirs) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serving")
    store = tmp / "store"
    for name, src in peft_dirs.items():  # the same files, placed by hand as loose version-1 adapters
        dest = store / "alice" / f"placed-{name.replace('_', '-')}"
        dest.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(src / f, dest / f)
    settings = cpu_settings(tiny_model_dir, store,
                            api_keys=write_keys(tmp / "keys.json"), max_adapters_resident=4, max_batch=2)
    app = create_app(settings)
    with running_server(app) as url:
        assert app.state.services.adapters is not None
        yield url


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


def generate(client: httpx.Client, adapter_id: str | None, max_new_tokens: int = 24, key: str = ALICE) -> dict:
    r = client.post("/generate", json={"prompt": PROMPT, "adapter_id": adapter_id, "temperature": 0,
                                       "max_new_tokens": max_new_tokens}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("kind", KINDS)
def test_uploaded_adapter_generates_like_the_placed_one(client: httpx.Client, kind: str, peft_dirs) -> None:
    adapter_id = f"up-{kind.replace('_', '-')}"
    assert upload(client, adapter_id, peft_dirs[kind]).status_code == 201
    uploaded = generate(client, adapter_id)
    placed = generate(client, f"placed-{kind.replace('_', '-')}")
    base = generate(client, None)
    assert uploaded["text"] == placed["text"]
    assert uploaded["text"] != base["text"], "the adapter must change the output, or this test proves nothing"
    openai = client.post("/v1/completions", json={"model": adapter_id, "prompt": PROMPT, "max_tokens": 24,
                                                  "temperature": 0}, headers=auth(ALICE))
    assert openai.status_code == 200 and openai.json()["choices"][0]["text"] == uploaded["text"]
    assert adapter_id in [m["id"] for m in client.get("/v1/models", headers=auth(ALICE)).json()["data"]]
    # Another tenant cannot generate with it.
    r = client.post("/generate", json={"prompt": PROMPT, "adapter_id": adapter_id}, headers=auth(BOB))
    assert r.status_code == 404


def test_upload_leaves_the_validated_adapter_in_the_host_tier(client: httpx.Client, server: str, peft_dirs) -> None:
    manager = app_of(server).state.services.adapters
    record = upload(client, "adopted", peft_dirs["lora_all"]).json()
    key = AdapterKey(record["tenant"], "adopted", record["version"])
    assert manager.host.get(key) is not None  # before any request: the upload's validation was kept
    assert generate(client, "adopted")["text"] == generate(client, "placed-lora-all")["text"]


def test_adapters_on_disk_at_start_are_prefetched_into_the_host_tier(server: str, peft_dirs) -> None:
    services = app_of(server).state.services
    keys = [services.store.resolve("alice", f"placed-{name.replace('_', '-')}").key for name in peft_dirs]
    assert wait_until(lambda: all(services.adapters.host.get(k) is not None for k in keys), timeout=60)


def stream_events(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^{name}\s+([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def running_requests(client: httpx.Client) -> float:
    return _gauge(client.get("/metrics", headers=auth(ADMIN)).text, "loraplex_running_requests")


def admitted_requests(client: httpx.Client) -> float:
    """Running + queued: requests whose adapter version is already fixed."""
    text = client.get("/metrics", headers=auth(ADMIN)).text
    return _gauge(text, "loraplex_running_requests") + _gauge(text, "loraplex_queue_depth")


def test_reupload_while_streaming_keeps_v1_for_the_running_request(client: httpx.Client, peft_dirs) -> None:
    n = 300
    ref_v1 = generate(client, "placed-lora-qv", n)
    ref_v2 = generate(client, "placed-lora-v2", n)
    assert ref_v1["text"] != ref_v2["text"]
    assert upload(client, "live", peft_dirs["lora_qv"]).json()["version"] == 1
    body = {"prompt": PROMPT, "adapter_id": "live", "temperature": 0, "max_new_tokens": n, "stream": True}
    with client.stream("POST", "/generate", json=body, headers=auth(ALICE)) as response:
        assert response.status_code == 200
        events = stream_events(response)
        chunks = [next(events)["text"]]
        r = upload(client, "live", peft_dirs["lora_v2"])  # v2 lands while v1 is mid-generation
        assert r.status_code == 201 and r.json()["version"] == 2
        assert running_requests(client) >= 1, "the streamed request must still be running during the upload"
        after = generate(client, "live", n)  # a request started after the upload
        for event in events:
            chunks.append(event.get("text", ""))
    assert "".join(chunks) == ref_v1["text"]
    assert after["text"] == ref_v2["text"]
    assert client.get("/v1/adapters/live", headers=auth(ALICE)).json()["version"] == 2


def test_delete_while_streaming_lets_the_request_finish(client: httpx.Client, peft_dirs) -> None:
    n = 200
    ref = generate(client, "placed-miss-balance", n)
    assert upload(client, "short-lived", peft_dirs["miss_balance"]).status_code == 201
    body = {"prompt": PROMPT, "adapter_id": "short-lived", "temperature": 0, "max_new_tokens": n, "stream": True}
    with client.stream("POST", "/generate", json=body, headers=auth(ALICE)) as response:
        events = stream_events(response)
        chunks = [next(events)["text"]]
        assert client.delete("/v1/adapters/short-lived", headers=auth(ALICE)).status_code == 204
        r = client.post("/generate", json={"prompt": PROMPT, "adapter_id": "short-lived"}, headers=auth(ALICE))
        assert r.status_code == 404
        for event in events:
            chunks.append(event.get("text", ""))
    assert "".join(chunks) == ref["text"]


def test_reupload_while_requests_queue_keeps_their_version(client: httpx.Client, server: str, peft_dirs) -> None:
    """max_batch=2: of 5 requests on v1, 3 wait in the queue when v2 lands; all finish on v1."""
    n = 120
    ref_v1 = generate(client, "placed-lora-embed", n)
    assert upload(client, "queued", peft_dirs["lora_embed"]).status_code == 201
    results: list[dict] = []

    def go() -> None:
        with httpx.Client(base_url=server, timeout=120) as c:
            results.append(generate(c, "queued", n))

    threads = [threading.Thread(target=go) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    # All five on the engine (2 running, 3 queued) before v2 lands: a request still in its HTTP handler
    # (e.g. waiting for the tokenizer) resolves its version later, and v2 is then the right answer for it.
    while (running_requests(client) < 2 or admitted_requests(client) < 5) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upload(client, "queued", peft_dirs["lora_v2"]).json()["version"] == 2
    for t in threads:
        t.join()
    assert [r["text"] for r in results] == [ref_v1["text"]] * 5


@pytest.fixture
def tight_server(tiny_model_dir: Path, tmp_path: Path, peft_dirs) -> Iterator[tuple[str, Gate]]:
    """One batch row and one host-tier entry: a queued request's version can fall out of host memory."""
    store = tmp_path / "store"
    dest = store / "alice" / "ref-qv"
    dest.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(peft_dirs["lora_qv"] / f, dest / f)
    settings = cpu_settings(tiny_model_dir, store,
                            api_keys=write_keys(tmp_path / "keys.json"), max_adapters_resident=2, max_batch=1,
                            max_adapters_host=1)
    app = create_app(settings)
    with running_server(app) as url:
        gate = gate_engine(app.state.services.engine)  # parks the engine between steps: a request stays queued
        yield url, gate


def test_reupload_keeps_the_files_of_a_queued_request_that_left_the_host_tier(tight_server, peft_dirs) -> None:
    """A queued request has no device pin yet; when its version falls out of the host tier, its admission
    re-reads that version's files, so a re-upload's garbage collection must leave them until it ends."""
    url, gate = tight_server
    services = app_of(url).state.services
    with httpx.Client(base_url=url, timeout=120) as client:
        ref = generate(client, "ref-qv")["text"]
        assert upload(client, "q", peft_dirs["lora_qv"]).json()["version"] == 1
        v1 = services.store.resolve("alice", "q")
        gate.arm()
        try:
            assert gate.entered.wait(30), "the engine never parked"
            result: list[dict] = []
            waiter = threading.Thread(
                target=lambda: result.append(generate(httpx.Client(base_url=url, timeout=120), "q")))
            waiter.start()
            assert wait_until(lambda: services.engine.waiting.is_queued(v1.key), timeout=30)
            assert upload(client, "other", peft_dirs["lora_v2"]).status_code == 201  # adopted: evicts q v1
            assert services.adapters.host.get(v1.key) is None
            assert upload(client, "q", peft_dirs["lora_v2"]).json()["version"] == 2  # collects old versions
            assert v1.path.exists(), "the queued request's version was collected"
        finally:
            gate.release()
        waiter.join(timeout=120)
        assert [r["text"] for r in result] == [ref]
        assert wait_until(lambda: not v1.path.exists(), timeout=30), "v1 must go once its request ended"


def test_queued_request_whose_files_are_gone_fails_cleanly(tight_server, peft_dirs) -> None:
    """Deleted while queued, and its host copy aged out: admission cannot re-read the files. The request
    gets an error that says so (not a bad-file verdict about the version dir); the server goes on."""
    url, gate = tight_server
    services = app_of(url).state.services
    with httpx.Client(base_url=url, timeout=60) as client:
        assert upload(client, "doomed", peft_dirs["lora_qv"]).status_code == 201
        key = services.store.resolve("alice", "doomed").key
        gate.arm()
        try:
            assert gate.entered.wait(30), "the engine never parked"
            answer: list[httpx.Response] = []
            body = {"prompt": PROMPT, "adapter_id": "doomed", "temperature": 0, "max_new_tokens": 8}
            waiter = threading.Thread(target=lambda: answer.append(
                httpx.post(f"{url}/generate", json=body, headers=auth(ALICE), timeout=60)))
            waiter.start()
            assert wait_until(lambda: services.engine.waiting.is_queued(key), timeout=30)
            assert upload(client, "other", peft_dirs["lora_v2"]).status_code == 201  # evicts it from the host tier
            assert client.delete("/v1/adapters/doomed", headers=auth(ALICE)).status_code == 204
        finally:
            gate.release()
        waiter.join(timeout=60)
        assert answer, "the queued request never got an answer"
        r = answer[0]
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["message"] == "adapter 'doomed' version 1 is no longer in the store"
        assert generate(client, "other")["text"]  # still serving

"""Two replicas on loopback answer the acceptance flows exactly as one process does.

One cluster and one single-process server per module, on the same tiny model
and the same uploads; greedy outputs must be identical token for token.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.api.adapter_http import ADMIN, ALICE, BOB, auth, build_adapter, load_tiny, upload, write_keys
from tests.cluster.cluster_harness import REPLICA_HEADER, call_any_replica, cluster_settings, running_cluster
from tests.harness import TRAIN_DATA, cpu_settings, openai_client, running_server, wait_job

pytest.importorskip("ray")

PROMPT = {"prompt": "The tiny model says", "max_new_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("keys") / "keys.json")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    base = load_tiny(tiny_model_dir)
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(base, "lora_qv", root / name, seed=seed, scale=0.5)
            for name, seed in (("one", 1), ("two", 2), ("three", 3))}


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, keys):
    with running_cluster(cluster_settings(tiny_model_dir, tmp_path_factory.mktemp("cstore"), keys)) as url:
        yield url


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory, keys):
    settings = cpu_settings(tiny_model_dir, tmp_path_factory.mktemp("sstore"), api_keys=keys, max_batch=4,
                            max_queue=32, tokenize_workers=1)
    with running_server(settings) as url:
        yield url


def both(cluster: str, single: str, fn):
    """fn(url) on the cluster and on the single server: (cluster's result, single's result)."""
    return fn(cluster), fn(single)


def generate(url: str, key: str = ALICE, **body) -> httpx.Response:
    return httpx.post(f"{url}/generate", json={**PROMPT, **body}, headers=auth(key), timeout=120)


def test_upload_generate_stream_and_openai_match_one_process(cluster, single, adapters):
    for url in (cluster, single):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert upload(client, "one", adapters["one"]).status_code == 201
    base, base1 = both(cluster, single, lambda u: generate(u))
    assert base.status_code == 200 and base.json()["text"] == base1.json()["text"]
    assert base.headers.get("x-request-id")  # the replica's own headers come through the ingress
    tuned, tuned1 = both(cluster, single, lambda u: generate(u, adapter_id="one"))
    assert tuned.json()["text"] == tuned1.json()["text"] != base.json()["text"]

    def stream(url: str) -> list[str]:
        with httpx.stream("POST", f"{url}/generate", json={**PROMPT, "adapter_id": "one", "stream": True},
                          headers=auth(ALICE), timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return [line for line in r.iter_lines() if line]

    events, events1 = both(cluster, single, stream)
    assert _texts(events) == _texts(events1) and len(events) > 2

    def chat(url: str) -> str:
        client = openai_client(url)
        client.api_key = ALICE
        out = client.chat.completions.create(model="one", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=8, temperature=0)
        return out.choices[0].message.content

    assert chat(cluster) == chat(single)


def _texts(events: list[str]) -> list[str]:
    return [json.loads(e[5:]).get("text", "") for e in events if e.startswith("data:") and e[5:].strip()[:1] == "{"]


def test_errors_pass_through_unchanged(cluster, single):
    for path, body, key in (("/generate", {**PROMPT, "adapter_id": "nope"}, ALICE),
                            ("/generate", {**PROMPT, "bogus": 1}, ALICE),
                            ("/generate", PROMPT, "wrong-key")):
        r, r1 = both(cluster, single, lambda u: httpx.post(f"{u}{path}", json=body, headers=auth(key), timeout=60))
        assert (r.status_code, r.json()["error"]["type"]) == (r1.status_code, r1.json()["error"]["type"])
        assert r.json()["error"]["message"] == r1.json()["error"]["message"]


def test_the_front_door_refuses_on_the_head_without_reading_the_body(cluster):
    """An unauthenticated or over-the-limit request is answered from its head at the ingress: the client
    declares 500 MiB, asks for `100 Continue` and sends none of it, and still gets its JSON 401 / 413 (with a
    request id) at once."""
    from tests.api.raw_http import connect, json_body, read_response

    for key, status in ((None, 401), ("not-a-key-123", 401), (ALICE, 413)):
        lines = ["PUT /v1/adapters/big HTTP/1.1", "Host: t", f"Content-Length: {500 * 1024 * 1024}",
                 "Content-Type: multipart/form-data; boundary=xyz", "Expect: 100-continue",
                 *([f"Authorization: Bearer {key}"] if key else [])]
        with connect(cluster, timeout=20) as sock:
            started = time.monotonic()
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            got, headers, body = read_response(sock)
        assert (got, json_body(body)["error"]["type"]) == (status, "unauthorized" if status == 401
                                                           else "payload_too_large"), body[:200]
        assert headers.get("x-request-id") and time.monotonic() - started < 10


def test_request_ids_come_back_once(cluster, single):
    for url in (cluster, single):
        r = httpx.get(f"{url}/health", headers={"X-Request-ID": "trace-123"}, timeout=30)
        assert r.headers.get_list("x-request-id") == ["trace-123"]
        assert len(httpx.get(f"{url}/health", timeout=30).headers.get_list("x-request-id")) == 1


def test_tenant_isolation(cluster, single, adapters):
    for url in (cluster, single):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert upload(client, "same", adapters["two"], key=ALICE).status_code == 201
            assert upload(client, "same", adapters["three"], key=BOB).status_code == 201
    for key in (ALICE, BOB):
        r, r1 = both(cluster, single, lambda u: generate(u, key=key, adapter_id="same"))
        assert r.status_code == 200 and r.json()["text"] == r1.json()["text"]
    assert generate(cluster, key=ALICE, adapter_id="same").json()["text"] != \
        generate(cluster, key=BOB, adapter_id="same").json()["text"]
    r = generate(cluster, key=BOB, adapter_id="one")  # alice's adapter: not found, not leaked
    assert r.status_code == 404 and "one" in r.json()["error"]["message"]


def test_an_upload_is_served_by_every_replica(cluster, adapters):
    """Each replica answers with its id; requests without affinity spread, so both get asked."""
    with httpx.Client(base_url=cluster, timeout=60) as client:
        assert upload(client, "everywhere", adapters["two"]).status_code == 201
    expected = generate(cluster, adapter_id="everywhere").json()["text"]
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        status, headers, body = call_any_replica("/generate", {**PROMPT, "adapter_id": "everywhere"}, auth(ALICE))
        assert status == 200
        seen[headers[REPLICA_HEADER]] = json.loads(body)["text"]
    assert len(seen) == 2 and set(seen.values()) == {expected}


def test_merge_is_followed_by_every_replica(cluster, single, adapters):
    for url in (cluster, single):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert upload(client, "dedicated", adapters["three"]).status_code == 201
            assert client.post("/v1/adapters/dedicated/merge", headers=auth(ALICE)).status_code == 201
    r, r1 = both(cluster, single, lambda u: generate(u, adapter_id="dedicated"))
    assert r.json()["text"] == r1.json()["text"]
    metrics = _wait_metric(cluster, "loraplex_merged_copies", lambda values: values == [1.0, 1.0])
    assert metrics
    for url in (cluster, single):
        assert httpx.delete(f"{url}/v1/adapters/dedicated/merge", headers=auth(ALICE),
                            timeout=60).json()["mode"] == "unmerged"
    assert _wait_metric(cluster, "loraplex_merged_copies", lambda values: values == [0.0, 0.0])


def _wait_metric(url: str, name: str, ok, timeout: float = 30) -> bool:
    """Poll /metrics (admin) until `ok(values of name per replica)`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", headers=auth(ADMIN), timeout=30).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") and 'replica="' in line]
        if ok(values):
            return True
        time.sleep(0.5)
    return False


def test_ready_and_metrics_span_every_replica(cluster):
    ready = httpx.get(f"{cluster}/ready", timeout=30).json()
    assert ready["ready"] is True and ready["replicas"] == 2
    text = httpx.get(f"{cluster}/metrics", headers=auth(ADMIN), timeout=30).text
    replicas = {line.split('replica="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'replica="' in line}
    assert len(replicas) == 2
    own = httpx.get(f"{cluster}/metrics", headers=auth(BOB), timeout=30).text
    assert 'tenant="alice"' not in own
    assert httpx.get(f"{cluster}/metrics", timeout=30).status_code == 401


def test_training_runs_once_and_serves_everywhere(cluster, single):
    job = {"adapter_id": "trained", "rank": 4, "target_modules": ["q_proj", "v_proj"], "data": TRAIN_DATA,
           "steps": 4, "learning_rate": 1e-2, "batch_size": 2, "seed": 0}
    done = {}
    for url in (cluster, single):
        r = httpx.post(f"{url}/v1/training/jobs", json=job, headers=auth(ALICE), timeout=60)
        assert r.status_code == 202
        done[url] = wait_job(url, r.json()["id"], lambda j: j["status"] in ("succeeded", "failed"),
                             headers=auth(ALICE))
    assert done[cluster]["status"] == "succeeded" and done[cluster]["attempts"] == 1
    r, r1 = both(cluster, single, lambda u: generate(u, adapter_id="trained"))
    assert r.status_code == 200 and r.json()["text"] == r1.json()["text"]


def test_a_client_that_leaves_mid_stream_cancels_on_the_replica(cluster):
    """The disconnect crosses proxy → ingress → replica: the engine finishes the request as cancelled."""
    def cancelled() -> float:
        text = httpx.get(f"{cluster}/metrics", headers=auth(ADMIN), timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("loraplex_requests_total{") and 'finish_reason="cancelled"' in line)

    time.sleep(1.5)  # the replicas' last posts include everything before this test
    before = cancelled()
    body = {"prompt": "Once upon a time", "max_new_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{cluster}/generate", json=body, headers=auth(ALICE), timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 30
    while cancelled() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert cancelled() == before + 1

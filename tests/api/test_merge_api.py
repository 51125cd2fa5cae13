"""The merge path over real HTTP: routes, mixed traffic, and changes while requests run.

"No adapter math" is checked through the engine's own accounting
(`adapter_tokens_by_key` / `merged_tokens_by_key`: tokens fed through a step
that ran adapter math vs a merged copy), never through timing. Every request
fed prompt + completion - 1 tokens, so the counters must move by exactly that.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.adapters.types import AdapterKey
from server.app import create_app
from tests.api.adapter_http import ADMIN, ALICE, BOB, auth, build_adapter, load_tiny, upload, write_keys
from tests.api.test_adapters_serving import stream_events
from tests.harness import Gate, cpu_settings, gate_engine, running_server, wait_until

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Once upon a time, in a land far away,"]
SOURCES = {"v1": ("lora_qv", 1, 1.0), "v2": ("lora_all", 7, 1.0), "bat": ("miss_bat", 2, 1.0),
           "embed": ("lora_embed", 3, 1.0), "balance": ("miss_balance", 4, 1.0), "bone": ("bone", 5, 1.0),
           "huge": ("lora_qv", 6, 1e25)}  # huge: finite weights (accepted) whose ΔW overflows float32


@pytest.fixture(scope="module")
def dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("merge-peft")
    base = load_tiny(tiny_model_dir)
    return {name: build_adapter(base, kind, out / name, seed=seed, scale=scale)
            for name, (kind, seed, scale) in SOURCES.items()}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object, Gate]]:
    tmp = tmp_path_factory.mktemp("merge-server")
    settings = cpu_settings(tiny_model_dir, tmp / "store",
                            api_keys=write_keys(tmp / "keys.json"), max_adapters_resident=4, max_batch=6,
                            max_merged=2)
    app = create_app(settings)
    with running_server(app) as url:
        services = app.state.services
        gate = gate_engine(services.engine)  # parks the engine between steps on demand
        yield url, services, gate


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=120) as c:
        yield c


def generate(client: httpx.Client, adapter_id: str | None, n: int = 24, key: str = ALICE,
             prompt: str = PROMPTS[0]) -> dict:
    r = client.post("/generate", json={"prompt": prompt, "adapter_id": adapter_id, "temperature": 0,
                                       "max_new_tokens": n}, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def fed(result: dict) -> int:
    """Tokens a request put through the model: its prompt, then every sampled token but the last."""
    return result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"] - 1


def merge(client: httpx.Client, adapter_id: str, key: str = ALICE, method: str = "POST") -> httpx.Response:
    return client.request(method, f"/v1/adapters/{adapter_id}/merge", headers=auth(key))


def metric(client: httpx.Client, name: str) -> float:
    m = re.search(rf"^{name}\s+([0-9.e+-]+)$", client.get("/metrics", headers=auth(ADMIN)).text, re.M)
    assert m, name
    return float(m.group(1))


def counters(services, key: AdapterKey) -> tuple[int, int]:
    engine = services.engine
    return engine.adapter_tokens_by_key[key], engine.merged_tokens_by_key[key]


def test_merge_routes_record_and_metrics(client, server, dirs) -> None:
    _, services, _ = server
    assert upload(client, "ded-a", dirs["bat"]).status_code == 201
    key = AdapterKey("alice", "ded-a", 1)
    ref = generate(client, "ded-a")
    assert ref["text"] != generate(client, None)["text"], "the adapter must change the output"
    r = merge(client, "ded-a")
    assert r.status_code == 201 and r.json()["mode"] == "merged" and r.json()["id"] == "ded-a"
    again = merge(client, "ded-a")
    assert again.status_code == 200 and again.json()["mode"] == "merged"
    assert client.get("/v1/adapters/ded-a", headers=auth(ALICE)).json()["mode"] == "merged"
    listed = {a["id"]: a["mode"] for a in client.get("/v1/adapters", headers=auth(ALICE)).json()["data"]}
    assert listed["ded-a"] == "merged"
    for method in ("POST", "DELETE"):
        assert merge(client, "ded-a", key=BOB, method=method).status_code == 404  # another tenant's: not found
        assert merge(client, "nope", method=method).status_code == 404
        bad = merge(client, "Bad!", method=method)
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request_error"
    assert metric(client, "loraplex_merged_copies") == 1 and metric(client, "loraplex_merged_bytes") > 0

    adapter_before, merged_before = counters(services, key)
    merged_out = generate(client, "ded-a")
    assert merged_out["text"] == ref["text"]
    assert counters(services, key) == (adapter_before, merged_before + fed(merged_out))

    r = merge(client, "ded-a", method="DELETE")
    assert r.status_code == 200 and r.json()["mode"] == "unmerged"
    assert merge(client, "ded-a", method="DELETE").status_code == 200  # idempotent
    assert wait_until(lambda: metric(client, "loraplex_merged_copies") == 0)
    assert metric(client, "loraplex_merged_bytes") == 0
    unmerged_out = generate(client, "ded-a")
    assert unmerged_out["text"] == ref["text"]
    assert counters(services, key) == (adapter_before + fed(unmerged_out), merged_before + fed(merged_out))


def test_mixed_traffic_dedicated_tenant_never_runs_adapter_math(client, server, dirs) -> None:
    url, services, _ = server
    tenants = {"mix-ded": ALICE, "mix-u1": ALICE, "mix-u2": BOB, "mix-u3": BOB}
    for (adapter_id, key), src in zip(tenants.items(), ("embed", "v1", "balance", "bone")):
        assert upload(client, adapter_id, dirs[src], key=key).status_code == 201
    jobs = [(a, k, p) for a, k in [*tenants.items(), (None, ALICE), (None, BOB)] for p in PROMPTS]
    jobs += [("mix-ded", ALICE, p) for p in PROMPTS] * 2  # the dedicated tenant sends the most
    refs = {(a, k, p): generate(client, a, key=k, prompt=p)["text"] for a, k, p in set(jobs)}  # solo, unmerged
    assert merge(client, "mix-ded").json()["mode"] == "merged"
    keys = {a: AdapterKey({ALICE: "alice", BOB: "bob"}[k], a, 1) for a, k in tenants.items()}
    before = {a: counters(services, keys[a]) for a in tenants}
    recomputed = services.engine.recomputed_tokens

    def one(job: tuple) -> tuple[tuple, dict]:
        with httpx.Client(base_url=url, timeout=120) as c:
            return job, generate(c, job[0], key=job[1], prompt=job[2])

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
    finally:
        merge(client, "mix-ded", method="DELETE")
    for job, result in results:
        assert result["text"] == refs[job], f"{job} differs from its solo reference"
    # Each adapter's tokens went one way only: the dedicated one's through its merged lane, the others'
    # through adapter math. Beyond the tokens the requests fed, a count may hold only what the engine
    # recomputed for sequences preempted between the two tenants (the same path again).
    excess = 0
    for adapter_id in tenants:
        adapter, merged = (a - b for a, b in zip(counters(services, keys[adapter_id]), before[adapter_id]))
        used, unused = (merged, adapter) if adapter_id == "mix-ded" else (adapter, merged)
        assert unused == 0, f"{adapter_id} ran the other path"
        wanted = sum(fed(r) for job, r in results if job[0] == adapter_id)
        assert used >= wanted, adapter_id
        excess += used - wanted
    assert excess <= services.engine.recomputed_tokens - recomputed


@contextlib.contextmanager
def parked(services, gate: Gate) -> Iterator[None]:
    """The engine thread waits between steps until the block ends (running requests stay running)."""
    gate.arm()
    services.engine.wake()
    assert gate.entered.wait(30), "the engine never reached the gate"
    try:
        yield
    finally:
        gate.release()


def long_lanes(services, key: AdapterKey, n: int) -> list[int | None]:
    """Lanes of the running `n`-token requests of `key` (the streams; the short background ones excluded)."""
    return [s.lane for s in list(services.engine.scheduler.running)
            if s.request.adapter_key == key and s.request.params.max_new_tokens == n]


def test_dedicate_undedicate_reupload_while_requests_run(client, server, dirs) -> None:
    url, services, gate = server
    reg, n = services.merge, 300
    refs = {}
    for version in ("v1", "v2"):
        assert upload(client, f"ref-{version}", dirs[version]).status_code == 201
        refs[version] = generate(client, f"ref-{version}", n)["text"]
    assert refs["v1"] != refs["v2"]
    assert upload(client, "live", dirs["v1"]).status_code == 201
    v1, v2 = AdapterKey("alice", "live", 1), AdapterKey("alice", "live", 2)
    assert merge(client, "live").status_code == 201
    body = {"prompt": PROMPTS[0], "adapter_id": "live", "temperature": 0, "max_new_tokens": n, "stream": True}
    texts: dict[str, str] = {}
    background: list[dict] = []
    stop = threading.Event()

    def stream(name: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/generate", json=body,
                                                                     headers=auth(ALICE)) as response:
            assert response.status_code == 200
            texts[name] = "".join(e.get("text", "") for e in stream_events(response))

    def hammer() -> None:  # short requests on "live" throughout every change below
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                background.append(generate(c, "live", 16))

    with ThreadPoolExecutor(4) as pool:
        load = pool.submit(hammer)
        s1 = pool.submit(stream, "s1")
        assert wait_until(lambda: long_lanes(services, v1, n) != [])
        with parked(services, gate):  # un-merge while s1 runs in the merged lane
            assert long_lanes(services, v1, n) == [reg.lane_of(v1)] and reg.lane_of(v1) is not None
            unmerge = pool.submit(merge, client, "live", ALICE, "DELETE")
            assert wait_until(lambda: reg.stats()["pending"] >= 1)
        assert unmerge.result().json()["mode"] == "unmerged"
        unmerged_after = generate(client, "live", n)
        assert merge(client, "live").status_code == 201  # merged again: a fresh copy of v1
        s3 = pool.submit(stream, "s3")
        assert wait_until(lambda: long_lanes(services, v1, n) != [])
        with parked(services, gate):  # re-upload while s3 runs on v1's copy
            assert long_lanes(services, v1, n) == [reg.lane_of(v1)] and reg.lane_of(v1) is not None
            reupload = pool.submit(upload, client, "live", dirs["v2"])
            assert wait_until(lambda: reg.stats()["pending"] >= 1, timeout=60)
        assert reupload.result().json()["version"] == 2 and reupload.result().json()["mode"] == "merged"
        after = generate(client, "live", n)
        s1.result(), s3.result()
        stop.set()
        load.result()
    assert texts["s1"] == texts["s3"] == unmerged_after["text"] == refs["v1"]
    assert after["text"] == refs["v2"]
    # Engine parked from before v2 was published until its copy was: no v2 token ever ran adapter math.
    assert counters(services, v2)[0] == 0 and counters(services, v2)[1] >= fed(after)
    shorts = {v: generate(client, f"ref-{v}", 16)["text"] for v in ("v1", "v2")}
    assert background and all(r["text"] in shorts.values() for r in background), "a request mixed versions"
    assert wait_until(lambda: reg.stats()["copies"] == 1 and reg.stats()["draining"] == 0)  # only v2's copy left
    assert client.delete("/v1/adapters/live", headers=auth(ALICE)).status_code == 204
    assert wait_until(lambda: reg.stats()["copies"] == 0 and reg.stats()["dedicated"] == 0)


def test_cap_conflict_and_unsafe_merge(client, server, dirs) -> None:
    _, services, _ = server
    for name in ("cap-a", "cap-b", "cap-c"):
        assert upload(client, name, dirs["v1"]).status_code == 201
    assert merge(client, "cap-a").status_code == 201 and merge(client, "cap-b").status_code == 201
    r = merge(client, "cap-c")
    assert r.status_code == 409 and "max_merged" in r.json()["error"]["message"]
    assert client.get("/v1/adapters/cap-c", headers=auth(ALICE)).json()["mode"] == "unmerged"
    assert merge(client, "cap-a", method="DELETE").status_code == 200
    assert merge(client, "cap-c").status_code == 201
    for name in ("cap-b", "cap-c"):
        assert merge(client, name, method="DELETE").status_code == 200
    assert upload(client, "huge", dirs["huge"]).status_code == 201
    r = merge(client, "huge")
    assert r.status_code == 422 and "safe merge" in r.json()["error"]["message"]
    assert client.get("/v1/adapters/huge", headers=auth(ALICE)).json()["mode"] == "unmerged"
    assert wait_until(lambda: services.merge.stats()["copies"] == 0)

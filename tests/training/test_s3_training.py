"""Training on servers that share one bucket and nothing else (separate --store dirs = two machines).

A job submitted through one server is seen, progress and all, through the
other; it runs once, is cancelled from either, survives its owner going
silent (the other takes it over after the lease) and a stale owner never
publishes. moto's conditional writes are check-then-put, so trainers here
contend in turn (see test_s3_jobs.py); the lease is short (LEASE_S) so
takeovers happen within seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.adapters.limits import AdapterLimits
from server.adapters.service import AdapterService
from server.adapters.store.object_store import ObjectStore, S3Options
from server.adapters.store.s3_store import open_s3_store
from server.errors import NotFound
from server.training.s3_jobs import S3JobQueue
from server.training.service import TrainingService
from server.training.worker import LeaseLost
from tests.adapters.store.s3_moto import MotoS3, moto_s3
from tests.api.adapter_http import ALICE, auth, write_keys
from tests.harness import TRAIN_DATA, app_of, cpu_settings, gate_engine, running_server, wait_job, wait_until
from tests.training.conftest import make_spec, settings_for

LEASE_S = 1.5
# The two real servers renew from a thread that shares the test process's GIL with both engines' training
# steps: at 1.5 s one slow renewal on a loaded box handed a healthy owner's job to the other server.
SERVER_LEASE_S = 6.0
SKEW_S = 0.2
S3 = {"train_lease_s": LEASE_S, "train_clock_skew_s": SKEW_S, "s3_region": "us-east-1", "s3_timeout_s": 1.0,
      "s3_max_attempts": 1}


# ------------------------------------------------------------- two services, stepped by hand
def s3_service(model_dir: Path, store: Path, base: Any, options: S3Options,
               lease_s: float = LEASE_S) -> TrainingService:
    settings = settings_for(model_dir, store, s3_store=str(options.location), s3_endpoint_url=options.endpoint_url,
                            **{**S3, "train_lease_s": lease_s})
    limits = AdapterLimits.from_settings(settings)
    adapters = AdapterService(base, open_s3_store(options, store, settings.s3_cache_bytes), limits)
    queue = S3JobQueue(ObjectStore(options), uuid.uuid4().hex, lease_s, SKEW_S, settings.train_max_attempts)
    return TrainingService(settings, base, adapters, queue=queue)


def test_a_stale_owner_never_publishes(tiny_model_dir, tiny_served, tmp_path, moto: MotoS3) -> None:
    """A goes silent (its heartbeat stops) mid-job; B takes the job over after the lease and publishes it
    once; A, back, may neither publish nor write progress."""
    options = moto.new_bucket()
    a = s3_service(tiny_model_dir, tmp_path / "a", tiny_served, options)
    b = s3_service(tiny_model_dir, tmp_path / "b", tiny_served, options)
    try:
        record, _ = a.submit(make_spec(adapter_id="t", steps=4), "acme", None)
        for _ in range(3):  # claim, 2 steps
            a.worker.run_one_step()
        stale = a.worker._job
        assert stale is not None and a.get(record["id"], "acme")["progress"]["step"] == 2
        a._stop.set()  # "the machine froze": no more heartbeats from A
        a._ticker.join(timeout=10)
        b.worker.notify()
        b.worker.run_one_step()
        assert b.worker.active_job_id is None, "A's lease is still live"
        time.sleep(LEASE_S + SKEW_S + 0.1)
        b.worker.notify()
        b.worker.run_one_step()
        assert b.worker.active_job_id == record["id"] and b.get(record["id"], "acme")["attempts"] == 2
        stale.trainer.train_step()
        stale.trainer.train_step()  # A's trainer is done, as if it had run on while silent ...
        with pytest.raises(LeaseLost):
            a.worker._publish(stale)  # ... but it checks the lease first
        with pytest.raises(NotFound):
            a.worker.adapters.store.get("acme", "t")
        a.worker.run_one_step()
        assert a.worker.active_job_id is None, "a stale owner drops the job at its next step"
        assert a.jobs.leases.held_ids() == set(), "... and stops renewing its lease"
        for _ in range(20):
            if b.worker.active_job_id is None:
                break
            b.worker.run_one_step()
        got = a.get(record["id"], "acme")
        assert got["status"] == "succeeded" and got["attempts"] == 2 and got["adapter_version"] == 1
        assert [h["step"] for h in got["loss_history"]] == [1, 2, 3, 4]
        assert a.worker.adapters.store.get("acme", "t").record["training_job"] == record["id"]
    finally:
        a.close()
        b.close()


def test_a_running_job_pauses_while_the_bucket_is_away(tiny_model_dir, tiny_served, tmp_path) -> None:
    """A bucket outage shorter than the lease: the job neither fails nor moves; it goes on once it is back."""
    with moto_s3() as server:
        options = server.new_bucket()
        svc = s3_service(tiny_model_dir, tmp_path / "a", tiny_served, options, lease_s=20.0)
        try:
            record, _ = svc.submit(make_spec(adapter_id="t", steps=3), "acme", None)
            svc.worker.run_one_step()  # claim
            svc.worker.run_one_step()  # step 1
            server.stop()
            svc.worker.run_one_step()
            assert svc.worker.active_job_id == record["id"], "paused, not failed"
            assert not svc.worker.has_work(), "and not retried at once (the engine would spin on timeouts)"
            server.start()
            assert wait_until(svc.worker.has_work, timeout=10)
            for _ in range(20):
                if svc.worker.active_job_id is None:
                    break
                svc.worker.run_one_step()
            got = svc.get(record["id"], "acme")
            assert got["status"] == "succeeded" and got["attempts"] == 1 and got["adapter_version"] == 1
        finally:
            svc.close()


# --------------------------------------------------------------------------- two real servers
@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            moto: MotoS3) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("s3-training")
    options = moto.new_bucket()
    keys = write_keys(tmp / "keys.json")

    def settings(name: str):  # its own --store (adapter cache; no job database used), the shared bucket
        return cpu_settings(tiny_model_dir, tmp / name, api_keys=keys, max_batch=2, max_adapters_resident=2,
                            max_rank=16, s3_store=str(options.location), s3_endpoint_url=moto.endpoint,
                            **{**S3, "train_lease_s": SERVER_LEASE_S})

    with running_server(settings("a")) as url_a, running_server(settings("b")) as url_b:
        yield url_a, url_b


def spec(adapter_id: str, steps: int) -> dict[str, Any]:
    return {"adapter_id": adapter_id, "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "data": TRAIN_DATA, "steps": steps, "learning_rate": 1e-2, "batch_size": 2, "seed": 0}


def submit(url: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{url}/v1/training/jobs", json=body, headers=auth(ALICE), timeout=60)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def running_on(urls: tuple[str, str], job_id: str) -> str:
    """The server whose trainer runs the job (waits until one does)."""
    assert wait_until(lambda: any(app_of(u).state.services.jobs.worker.active_job_id == job_id for u in urls),
                      timeout=60)
    return next(u for u in urls if app_of(u).state.services.jobs.worker.active_job_id == job_id)


def get(url: str, path: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers=auth(ALICE), timeout=60)


def test_a_job_submitted_to_one_server_is_seen_on_the_other_and_runs_once(servers) -> None:
    a, b = servers
    job_id = submit(a, spec("once", steps=6))
    seen = get(b, f"/v1/training/jobs/{job_id}")
    assert seen.status_code == 200 and seen.json()["status"] in ("queued", "running")
    progressed = wait_job(b, job_id, lambda j: j["progress"]["step"] >= 1 or j["status"] != "queued",
                          headers=auth(ALICE), timeout=60)
    assert progressed["status"] in ("running", "succeeded")
    job = wait_job(b, job_id, lambda j: j["status"] in ("succeeded", "failed"), headers=auth(ALICE), timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert [h["step"] for h in job["loss_history"]] == list(range(1, 7)), "every step once"
    assert job_id in [j["id"] for j in get(b, "/v1/training/jobs").json()["data"]]
    for url in (a, b):  # one published version, servable from both
        adapter = get(url, "/v1/adapters/once")
        assert adapter.status_code == 200 and adapter.json()["version"] == 1 == job["adapter_version"]


def test_a_cancel_through_the_other_server_stops_the_job(servers) -> None:
    a, b = servers
    job_id = submit(a, spec("stopped", steps=2000))
    owner = running_on(servers, job_id)
    other = b if owner == a else a
    wait_job(other, job_id, lambda j: j["progress"]["step"] >= 1, headers=auth(ALICE), timeout=60)
    r = httpx.post(f"{other}/v1/training/jobs/{job_id}/cancel", headers=auth(ALICE), timeout=60)
    assert r.status_code in (200, 202) and r.json()["cancel_requested"], r.text
    job = wait_job(owner, job_id, lambda j: j["status"] not in ("queued", "running"), headers=auth(ALICE),
                   timeout=30)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 2000
    assert wait_until(lambda: app_of(owner).state.services.jobs.worker.active_job_id is None, timeout=10)
    assert get(other, "/v1/adapters/stopped").status_code == 404


def test_a_silent_owners_job_is_taken_over_and_finished_by_the_other(servers) -> None:
    """The owner freezes (engine parked, heartbeat stopped, lease left in the bucket): after the lease the
    other server requeues the job, runs it from the start and publishes it once; the owner, thawed,
    drops it and publishes nothing."""
    a, b = servers
    steps = 100
    job_id = submit(a, spec("takeover", steps=steps))
    owner = running_on(servers, job_id)
    other = b if owner == a else a
    training = app_of(owner).state.services.jobs
    gate = gate_engine(app_of(owner).state.services.engine)
    gate.arm()
    assert gate.entered.wait(30)
    training._stop.set()  # its heartbeat thread ends; the lease object stays
    training._ticker.join(timeout=10)
    try:
        assert get(other, f"/v1/training/jobs/{job_id}").json()["status"] == "running", "froze mid-job"
        job = wait_job(other, job_id, lambda j: j["status"] in ("succeeded", "failed"), headers=auth(ALICE),
                       timeout=120)
        assert app_of(owner).state.services.jobs.worker.active_job_id == job_id, "the owner stayed frozen"
    finally:
        gate.release()
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert [h["step"] for h in job["loss_history"]] == list(range(1, steps + 1)), "redone once, not twice"
    assert wait_until(lambda: training.worker.active_job_id is None, timeout=10), "the stale owner stops"
    for url in (a, b):
        adapter = get(url, "/v1/adapters/takeover")
        assert adapter.status_code == 200 and adapter.json()["version"] == 1 == job["adapter_version"]
    assert get(owner, f"/v1/training/jobs/{job_id}").json() == get(other, f"/v1/training/jobs/{job_id}").json()


def test_an_unreachable_bucket_is_a_503_on_training_routes(servers, moto: MotoS3) -> None:
    """Runs last in this module: it stops the module's moto server (and starts it again)."""
    a, b = servers
    job_id = submit(a, spec("down", steps=2))
    wait_job(a, job_id, lambda j: j["status"] == "succeeded", headers=auth(ALICE), timeout=120)
    moto.stop()
    try:
        for call in (lambda: httpx.post(f"{b}/v1/training/jobs", json=spec("x", 2), headers=auth(ALICE), timeout=60),
                     lambda: get(b, "/v1/training/jobs"), lambda: get(b, f"/v1/training/jobs/{job_id}"),
                     lambda: httpx.post(f"{b}/v1/training/jobs/{job_id}/cancel", headers=auth(ALICE), timeout=60)):
            started = time.monotonic()
            r = call()
            assert time.monotonic() - started < 10.0, "bounded: timeouts, never a hang"
            assert r.status_code == 503 and r.json()["error"]["type"] == "store_unavailable", r.text
    finally:
        moto.start()
    assert get(b, f"/v1/training/jobs/{job_id}").json()["status"] == "succeeded"

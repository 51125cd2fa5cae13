"""`loraplex serve --replicas 2` as a process joining a Ray instance: a replica killed mid-load loses
no accepted upload or job, in-flight requests fail cleanly, and SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from server.training.jobs import JobStore
from tests.api.adapter_http import ADMIN, ALICE, adapter_files, auth, build_adapter, load_tiny, write_keys
from tests.cluster.cluster_harness import REPLICA_HEADER, wait_ready
from tests.harness import TRAIN_DATA, read_log, spawn_server, wait_job

ray = pytest.importorskip("ray")

UPLOADS = 10


@pytest.fixture(scope="module")
def ray_address():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _kill_replica(replica_id: str) -> None:
    """SIGKILL-like death of one replica's actor (Serve starts a replacement)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].endswith(f"#Replica#{replica_id}")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def _runner_of(url: str, steps: int, timeout: float = 30) -> str:
    """The replica whose /metrics series show the running job (replicas post every second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", headers=auth(ADMIN), timeout=30).text
        for line in text.splitlines():
            if line.startswith("loraplex_training_active_steps{") and float(line.rsplit(" ", 1)[1]) == steps:
                return line.split('replica="', 1)[1].split('"', 1)[0]
        time.sleep(0.3)
    raise AssertionError("no replica reports the running job")


def test_a_stream_whose_replica_dies_ends_with_an_error_event(ray_address, tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--store", str(tmp_path / "s"),
            "--replicas", "2", "--ray-address", ray_address, "--max-batch", "4"]
    with spawn_server(args, startup_timeout=240) as (proc, url):
        body = {"prompt": "Once upon a time", "max_new_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            _kill_replica(r.headers[REPLICA_HEADER])
            rest = [line for line in lines if line.startswith("data:")]
        assert '"type": "unavailable"' in rest[-1], rest[-3:]
        r = httpx.post(f"{url}/generate", json={**body, "stream": False}, timeout=120)  # others still serve
        assert r.status_code in (200, 503) and (r.status_code == 200 or r.json()["error"]["type"] == "unavailable")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0


def test_killed_replica_loses_no_accepted_upload_or_job(ray_address, tiny_model_dir, tmp_path):
    keys = write_keys(tmp_path / "keys.json")
    files = adapter_files(build_adapter(load_tiny(tiny_model_dir), "lora_qv", tmp_path / "a", seed=4, scale=0.5))
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--store", str(tmp_path / "s"),
            "--api-keys", str(keys), "--replicas", "2", "--ray-address", ray_address, "--max-batch", "4",
            "--drain-timeout", "10"]
    with spawn_server(args, startup_timeout=240) as (proc, url):
        job = {"adapter_id": "trained", "rank": 4, "target_modules": ["q_proj", "v_proj"], "data": TRAIN_DATA,
               "steps": 400, "learning_rate": 1e-3, "batch_size": 2, "seed": 0}
        r = httpx.post(f"{url}/v1/training/jobs", json=job, headers=auth(ALICE), timeout=60)
        assert r.status_code == 202
        job_id = r.json()["id"]
        wait_job(url, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0,
                 headers=auth(ALICE), timeout=60)
        trainer = _runner_of(url, job["steps"])

        outcomes: dict[str, int] = {}

        def upload_all() -> None:
            with httpx.Client(base_url=url, timeout=60) as client:
                for i in range(UPLOADS):
                    resp = client.put(f"/v1/adapters/up-{i}", files=files, headers=auth(ALICE))
                    assert resp.status_code in (201, 503), resp.text
                    assert "error" in resp.json() if resp.status_code == 503 else True
                    outcomes[f"up-{i}"] = resp.status_code

        uploader = threading.Thread(target=upload_all)
        uploader.start()
        time.sleep(0.3)
        _kill_replica(trainer)
        uploader.join(timeout=120)
        assert not uploader.is_alive() and len(outcomes) == UPLOADS  # nothing hung

        wait_ready(url, 180)  # Serve replaced the dead replica
        # The replacement requeued the dead replica's job (its owner lease died with it) and runs it again.
        wait_job(url, job_id, lambda j: j["status"] == "running" and j["attempts"] == 2, headers=auth(ALICE),
                 timeout=120)
        listed = {a["id"] for a in httpx.get(f"{url}/v1/adapters", headers=auth(ALICE), timeout=30).json()["data"]}
        accepted = {name for name, status in outcomes.items() if status == 201}
        assert accepted and accepted <= listed
        httpx.post(f"{url}/v1/training/jobs/{job_id}/cancel", headers=auth(ALICE), timeout=30)
        record = wait_job(url, job_id, lambda j: j["status"] in ("cancelled", "succeeded", "failed"),
                          headers=auth(ALICE), timeout=120)
        assert record["status"] == "cancelled" and record["attempts"] == 2  # requeued once, never run twice at once

        # SIGTERM mid-job: every replica runs its shutdown (the running job goes back to the queue), exit 0.
        r = httpx.post(f"{url}/v1/training/jobs", json={**job, "adapter_id": "later"}, headers=auth(ALICE), timeout=60)
        wait_job(url, r.json()["id"], lambda j: j["status"] == "running", headers=auth(ALICE), timeout=60)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, read_log(proc)[-3000:]
        assert time.monotonic() - began < 30  # drained, not force-killed after the grace period
    jobs = JobStore(tmp_path / "s" / ".training" / "jobs.sqlite3")
    assert jobs.get(r.json()["id"], None)["status"] == "queued"
    jobs.close()

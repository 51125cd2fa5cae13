"""Training jobs over real HTTP: submit → train → serve, validation, idempotency, cancel, tenants,
serving while training, and a kill -9 restart of a subprocess server mid-job."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.adapter_http import ADMIN as ADMIN_KEY, ALICE as ALICE_KEY, BOB as BOB_KEY, auth, write_keys
from tests.harness import TRAIN_DATA, app_of, cpu_settings, running_server, spawn_server, wait_job

ALICE, BOB, ADMIN = (auth(k) for k in (ALICE_KEY, BOB_KEY, ADMIN_KEY))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def body(**kw) -> dict:
    spec = dict(adapter_id="pirate", method="lora", rank=8, alpha=16, target_modules=["q_proj", "v_proj"],
                data=TRAIN_DATA, steps=5, learning_rate=1e-2, batch_size=2, seed=0)
    spec.update(kw)
    return spec


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("training-api")
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"), max_rank=32,
                            train_interleave_steps=1, max_train_steps=20_000)
    with running_server(settings) as base_url:
        yield base_url



def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def all_jobs(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/training/jobs", headers=ADMIN, params={"limit": 1000}).json()["data"]


def test_job_trains_an_adapter_that_serves_at_once(url):
    services = app_of(url).state.services
    # One copy of the base: the trainer works on the very model object the engine serves.
    assert services.jobs.worker.base is services.base and services.engine.runner.model is services.base.model
    storages = {n: p.untyped_storage().data_ptr() for n, p in services.base.model.named_parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in services.base.model.parameters())
    spec = body(adapter_id="pirate", target_modules=[*ALL_LINEAR, "lm_head"], steps=50)
    r = httpx.post(f"{url}/v1/training/jobs", json=spec, headers=ALICE)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["tenant"] == "alice" and job["progress"] == {"step": 0, "steps": 50}
    job = wait_job(url, job["id"], finished, headers=ALICE)
    assert job["status"] == "succeeded", job["error"]
    assert len(job["loss_history"]) == 50 and job["loss_history"][-1]["loss"] < 0.05 * job["loss_history"][0]["loss"]
    assert job["adapter"]["version"] == job["adapter_version"] == 1 and job["adapter"]["type"] == "lora"

    assert {n: p.untyped_storage().data_ptr() for n, p in services.base.model.named_parameters()} == storages
    assert sum(p.numel() * p.element_size() for p in services.base.model.parameters()) == param_bytes
    rec = httpx.get(f"{url}/v1/adapters/pirate", headers=ALICE).json()
    assert rec["version"] == 1 and rec["rank"] == 8
    for ex in TRAIN_DATA:
        out = httpx.post(f"{url}/generate", headers=ALICE, timeout=60,
                         json={"prompt": ex["prompt"], "adapter_id": "pirate", "max_new_tokens": 20}).json()
        assert out["text"] == ex["completion"] and out["finish_reason"] == "stop", out
    # Another tenant sees neither the job nor the adapter; an admin sees the job.
    assert httpx.get(f"{url}/v1/training/jobs/{job['id']}", headers=BOB).status_code == 404
    assert httpx.post(f"{url}/v1/training/jobs/{job['id']}/cancel", headers=BOB).status_code == 404
    assert httpx.get(f"{url}/v1/training/jobs", headers=BOB).json()["data"] == []
    assert httpx.get(f"{url}/v1/training/jobs/{job['id']}", headers=ADMIN).status_code == 200
    assert httpx.post(f"{url}/generate", headers=BOB, json={"prompt": "x", "adapter_id": "pirate"}).status_code == 404
    # Cancelling a finished job is a conflict.
    assert httpx.post(f"{url}/v1/training/jobs/{job['id']}/cancel", headers=ALICE).status_code == 409


@pytest.mark.parametrize("change, needle", [
    ({"data": []}, "data is empty"),
    ({"data": [{"prompt": "p"}]}, "completion"),
    ({"data": [{"prompt": "word " * 2000, "completion": "x"}]}, "limit per example"),
    ({"rank": 0}, "rank"),
    ({"rank": 64}, "rank 64 exceeds"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": 50}, "learning_rate"),
    ({"steps": 50_000}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"target_modules": ["attn.nonexistent"]}, "unknown target module"),
    ({"method": "miss", "target_modules": ["embed_tokens"]}, "MiSS cannot target"),
    ({"adapter_id": "../etc"}, "invalid adapter id"),
    ({"adapter_id": "A" * 70}, "invalid adapter id"),
    ({"schedule": "sawtooth"}, "schedule"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_submission_is_422_and_creates_no_job(url, change, needle):
    before = len(all_jobs(url))
    r = httpx.post(f"{url}/v1/training/jobs", json=body(**change), headers=ALICE)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] and needle in r.json()["error"]["message"]
    assert len(all_jobs(url)) == before


def test_idempotent_resubmission(url):
    headers = {**ALICE, "Idempotency-Key": "retry-me-1"}
    first = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="idem", steps=2), headers=headers)
    again = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="idem", steps=2), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    clash = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="idem", steps=3), headers=headers)
    assert clash.status_code == 409 and "Idempotency-Key" in clash.json()["error"]["message"]
    assert sum(j["adapter_id"] == "idem" for j in all_jobs(url)) == 1
    # Keys are per tenant.
    bob = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="idem", steps=3),
                     headers={**BOB, "Idempotency-Key": "retry-me-1"})
    assert bob.status_code == 202 and bob.json()["id"] != first.json()["id"]
    for job, who in ((first.json(), ALICE), (bob.json(), BOB)):
        wait_job(url, job["id"], finished, headers=who)


def test_cancel_running_within_one_step_and_queued_at_once(url):
    long = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="long", steps=10_000), headers=ALICE).json()
    queued = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="later"), headers=ALICE).json()
    wait_job(url, long["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2, headers=ALICE)
    r = httpx.post(f"{url}/v1/training/jobs/{queued['id']}/cancel", headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = httpx.post(f"{url}/v1/training/jobs/{long['id']}/cancel", headers=ALICE)
    assert r.status_code in (200, 202) and r.json()["cancel_requested"]
    step_at_cancel = r.json()["progress"]["step"]
    job = wait_job(url, long["id"], finished, headers=ALICE)
    assert job["status"] == "cancelled" and job["progress"]["step"] <= step_at_cancel + 1
    assert httpx.get(f"{url}/v1/adapters/long", headers=ALICE).status_code == 404
    assert httpx.get(f"{url}/v1/training/jobs/{queued['id']}", headers=ALICE).json()["progress"]["step"] == 0


def test_generation_during_training_completes_correctly(url):
    prompts = [f"Tell me about ship number {i}" for i in range(8)]

    def generate(prompt: str) -> httpx.Response:
        return httpx.post(f"{url}/generate", headers=ALICE, timeout=120,
                          json={"prompt": prompt, "max_new_tokens": 12})

    expected = [generate(p).json()["text"] for p in prompts]  # nothing training yet
    job = httpx.post(f"{url}/v1/training/jobs", json=body(adapter_id="busy", steps=10_000, batch_size=4,
                                                          target_modules=ALL_LINEAR), headers=ALICE).json()
    wait_job(url, job["id"], lambda j: j["progress"]["step"] >= 1, headers=ALICE)
    step_before = httpx.get(f"{url}/v1/training/jobs/{job['id']}", headers=ALICE).json()["progress"]["step"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(generate, prompts))
    step_after = httpx.get(f"{url}/v1/training/jobs/{job['id']}", headers=ALICE).json()["progress"]["step"]
    assert [r.status_code for r in responses] == [200] * len(prompts)
    assert [r.json()["text"] for r in responses] == expected
    assert step_after > step_before  # training kept going meanwhile
    httpx.post(f"{url}/v1/training/jobs/{job['id']}/cancel", headers=ALICE)
    assert wait_job(url, job["id"], finished, headers=ALICE)["status"] == "cancelled"


def test_jsonl_upload(url):
    lines = "\n".join(json.dumps(ex) for ex in TRAIN_DATA * 3) + "\n"
    spec = {k: v for k, v in body(adapter_id="uploaded", steps=2).items() if k != "data"}
    r = httpx.post(f"{url}/v1/training/jobs/upload", headers=ALICE,
                   data={"spec": json.dumps(spec)}, files={"data": ("train.jsonl", lines, "application/jsonl")})
    assert r.status_code == 202, r.text
    assert r.json()["num_examples"] == 6
    assert wait_job(url, r.json()["id"], finished, headers=ALICE)["status"] == "succeeded"
    for files, needle in (({"data": ("d.jsonl", "{not json}\n", "application/jsonl")}, "line 1"),
                          ({"data": ("d.jsonl", '{"prompt": "p"}\n', "application/jsonl")}, "completion"),
                          ({}, "'data' file")):
        r = httpx.post(f"{url}/v1/training/jobs/upload", headers=ALICE, data={"spec": json.dumps(spec)},
                       files=files or {"other": ("x", "y")})
        assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text


def test_restart_mid_job_resumes_never_vanishes_or_duplicates(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--store", str(tmp_path / "store"), "--device", "cpu",
            "--dtype", "float32"]
    env = {"LORAPLEX_TRAIN_CHECKPOINT_EVERY": "3"}
    spec = body(adapter_id="survivor", steps=60, batch_size=1)
    headers = {"Idempotency-Key": "restart-1"}
    with spawn_server(args, env=env) as (proc, base):
        job = httpx.post(f"{base}/v1/training/jobs", json=spec, headers=headers).json()
        wait_job(base, job["id"], lambda j: j["progress"]["step"] >= 7, headers={})
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with spawn_server(args, env=env) as (proc, base):
        seen = httpx.get(f"{base}/v1/training/jobs/{job['id']}").json()
        assert seen["status"] in ("queued", "running") and seen["progress"]["step"] >= 6
        again = httpx.post(f"{base}/v1/training/jobs", json=spec, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        done = wait_job(base, job["id"], finished, headers={}, timeout=300)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        assert [h["step"] for h in done["loss_history"]] == list(range(1, 61))
        listed = httpx.get(f"{base}/v1/training/jobs").json()["data"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert httpx.get(f"{base}/v1/adapters/survivor").json()["version"] == 1

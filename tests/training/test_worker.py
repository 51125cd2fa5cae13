"""The worker driven step by step, as the engine thread drives it: publish, cancel, crash and resume."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from server.adapters.limits import AdapterLimits
from server.adapters.service import AdapterService
from server.adapters.store.store import open_store
from server.errors import InvalidRequest
from server.training.service import TrainingService
from tests.training.conftest import make_spec, settings_for


@pytest.fixture
def settings(tiny_model_dir, tmp_path):
    return settings_for(tiny_model_dir, tmp_path / "store", train_checkpoint_every=2)


def service(settings, base) -> TrainingService:
    limits = AdapterLimits.from_settings(settings)
    return TrainingService(settings, base, AdapterService(base, open_store(settings.store, base, limits), limits))


def run_until_idle(svc: TrainingService, limit: int = 1000) -> int:
    calls = 0
    while svc.worker.has_work() and calls < limit:
        svc.worker.run_one_step()
        calls += 1
        if svc.worker.active_job_id is None and svc.jobs.count("queued") == 0:
            svc.worker.run_one_step()  # lets the worker notice the queue is empty
            break
    return calls


def test_job_trains_and_publishes_new_versions(settings, tiny_served):
    svc = service(settings, tiny_served)
    first, created = svc.submit(make_spec(adapter_id="pirate", steps=3), "acme", None)
    second, _ = svc.submit(make_spec(adapter_id="pirate", steps=2, seed=1), "acme", None)
    assert created and first["status"] == "queued"
    run_until_idle(svc)
    done = [svc.get(first["id"], "acme"), svc.get(second["id"], "acme")]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"]
    assert [d["adapter_version"] for d in done] == [1, 2]
    assert len(done[0]["loss_history"]) == 3 and done[0]["progress"] == {"step": 3, "steps": 3}
    stored = svc.worker.adapters.store.get("acme", "pirate")
    assert stored.ref.key.version == 2 and stored.record["training_job"] == second["id"]
    assert stored.record["type"] == "lora" and stored.record["rank"] == 8
    assert not (settings.store / ".training" / "checkpoints" / first["id"]).exists()
    assert not svc.worker.has_work()
    svc.close()


def test_a_trained_version_supersedes_the_last_like_an_upload(settings, tiny_served):
    """The worker publishes through the AdapterService: the version it replaces is collected, as after an
    upload, instead of staying on disk until the next restart's sweep."""
    svc = service(settings, tiny_served)
    for seed in (0, 1):
        svc.submit(make_spec(adapter_id="pirate", steps=1, seed=seed), "acme", None)
    run_until_idle(svc)
    adir = svc.worker.adapters.store.adapter_dir("acme", "pirate")
    assert sorted(p.name for p in adir.iterdir() if p.name.startswith("v")) == ["v000002"]
    svc.close()


def test_submit_validates_against_the_model_and_writes_nothing(settings, tiny_served):
    svc = service(settings, tiny_served)
    for spec, msg in ((make_spec(target_modules=["nope_proj"]), "unknown target module"),
                      (make_spec(method="miss", target_modules=["embed_tokens"]), "MiSS cannot target"),
                      (make_spec(method="miss", variant="bat", rank=24, target_modules=["q_proj"]), "bat"),
                      (make_spec(data=[{"prompt": "x " * 600, "completion": "y"}]), "limit per example")):
        with pytest.raises(InvalidRequest, match=msg):
            svc.submit(spec, "acme", None)
    assert svc.list(None) == []
    svc.close()


def test_cancel_takes_effect_within_one_step(settings, tiny_served):
    svc = service(settings, tiny_served)
    record, _ = svc.submit(make_spec(steps=50), "acme", None)
    for _ in range(4):
        svc.worker.run_one_step()  # start + 3 steps
    step = svc.get(record["id"], "acme")["progress"]["step"]
    assert svc.cancel(record["id"], "acme")["cancel_requested"]
    svc.worker.run_one_step()
    got = svc.get(record["id"], "acme")
    assert got["status"] == "cancelled" and got["progress"]["step"] == step
    assert svc.worker.active_job_id is None
    with pytest.raises(Exception, match="not found"):
        svc.worker.adapters.store.get("acme", "t")
    svc.close()


def test_crash_mid_job_resumes_from_checkpoint_to_the_same_adapter(settings, tiny_model_dir, tiny_served, tmp_path):
    spec = make_spec(steps=7, dropout=0.1)
    # Reference: an uninterrupted run in another store.
    ref_settings = settings_for(tiny_model_dir, tmp_path / "ref", train_checkpoint_every=2)
    ref = service(ref_settings, tiny_served)
    ref.submit(spec, "acme", None)
    run_until_idle(ref)
    ref_weights = load_file(ref.worker.adapters.store.resolve("acme", "t").path / "adapter_model.safetensors")
    ref.close()

    svc = service(settings, tiny_served)
    record, _ = svc.submit(spec, "acme", "key-1")
    for _ in range(6):  # start + 5 steps: checkpoint at step 4
        svc.worker.run_one_step()
    assert svc.get(record["id"], "acme")["progress"]["step"] == 5
    svc.worker._job = None  # "kill -9": no shutdown hook, the row still says running
    svc.jobs.close()  # and its owner's flock, as the kernel drops a dead process's

    again = service(settings, tiny_served)  # start-up: recover
    got = again.get(record["id"], "acme")
    assert got["status"] == "queued" and got["attempts"] == 1
    again.worker.run_one_step()  # resumes: rewinds to the checkpoint
    assert again.get(record["id"], "acme")["progress"]["step"] == 4
    run_until_idle(again)
    got = again.get(record["id"], "acme")
    assert got["status"] == "succeeded" and got["attempts"] == 2
    assert [h["step"] for h in got["loss_history"]] == list(range(1, 8))
    weights = load_file(again.worker.adapters.store.resolve("acme", "t").path / "adapter_model.safetensors")
    assert weights.keys() == ref_weights.keys()
    assert all((weights[k] == ref_weights[k]).all() for k in weights)
    # Same key, same body after the restart: still the one job.
    same, created = again.submit(spec, "acme", "key-1")
    assert not created and same["id"] == record["id"] and len(again.list(None)) == 1
    again.close()


def test_crash_after_publish_does_not_publish_twice(settings, tiny_served):
    svc = service(settings, tiny_served)
    record, _ = svc.submit(make_spec(steps=2), "acme", None)
    svc.worker.run_one_step()  # start
    svc.worker.run_one_step()  # step 1
    job = svc.worker._job
    job.trainer.train_step()  # step 2 (done), as the worker would ...
    job.trainer.save_checkpoint(job.checkpoints)
    svc.worker._publish(job)  # ... and published, then died before the row said so
    svc.worker._job = None
    svc.jobs.close()  # and its owner's flock, as the kernel drops a dead process's

    again = service(settings, tiny_served)
    run_until_idle(again)
    got = again.get(record["id"], "acme")
    assert got["status"] == "succeeded" and got["adapter_version"] == 1
    assert again.worker.adapters.store.resolve("acme", "t").key.version == 1
    again.close()


def test_graceful_shutdown_requeues_without_spending_an_attempt(settings, tiny_served):
    svc = service(settings, tiny_served)
    record, _ = svc.submit(make_spec(steps=20), "acme", None)
    for _ in range(4):
        svc.worker.run_one_step()
    svc.close()  # the shutdown hook
    again = service(settings, tiny_served)
    got = again.get(record["id"], "acme")
    assert got["status"] == "queued" and got["attempts"] == 0 and got["progress"]["step"] == 3
    again.worker.run_one_step()
    assert again.get(record["id"], "acme")["progress"]["step"] == 3  # checkpoint taken at shutdown
    again.close()

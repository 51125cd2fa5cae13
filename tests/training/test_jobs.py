"""The SQLite job queue: idempotency, claim order, cancel, crash recovery, tenant scoping."""

from __future__ import annotations

import pytest

from server.errors import Conflict, NotFound
from server.training.jobs import JobStore, NewJob


def new_job(tenant: str = "acme", key: str | None = None, body_hash: str = "h1", steps: int = 5) -> NewJob:
    return NewJob(tenant=tenant, adapter_id="a", spec_json="{}", params={"rank": 8}, num_examples=1, steps=steps,
                  body_hash=body_hash, idempotency_key=key)


@pytest.fixture
def jobs(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    yield store
    store.close()


def test_create_and_read_back(jobs):
    record, created = jobs.create(new_job())
    assert created and record["status"] == "queued" and record["progress"] == {"step": 0, "steps": 5}
    assert record["loss_history"] == [] and record["attempts"] == 0
    assert jobs.get(record["id"], "acme")["id"] == record["id"]
    assert [j["id"] for j in jobs.list("acme")] == [record["id"]]


def test_idempotency_key_same_body_same_job_different_body_conflict(jobs):
    first, created = jobs.create(new_job(key="k1"))
    again, created_again = jobs.create(new_job(key="k1"))
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(Conflict):
        jobs.create(new_job(key="k1", body_hash="other"))
    # Keys are per tenant: another tenant may use the same key.
    other, created_other = jobs.create(new_job(tenant="zeta", key="k1", body_hash="other"))
    assert created_other and other["id"] != first["id"]
    assert len(jobs.list(None)) == 2


def test_other_tenant_sees_nothing(jobs):
    record, _ = jobs.create(new_job())
    with pytest.raises(NotFound):
        jobs.get(record["id"], "zeta")
    with pytest.raises(NotFound):
        jobs.request_cancel(record["id"], "zeta")
    assert jobs.list("zeta") == []
    assert jobs.get(record["id"], None)["tenant"] == "acme"  # admin view


def test_claim_is_fifo_and_counts_attempts(jobs):
    a, _ = jobs.create(new_job())
    b, _ = jobs.create(new_job())
    assert jobs.claim_next() == (a["id"], "acme", "a", 1)
    assert jobs.claim_next() == (b["id"], "acme", "a", 1)
    assert jobs.claim_next() is None


def test_progress_rewind_and_finish(jobs):
    record, _ = jobs.create(new_job())
    jobs.claim_next()
    for step in (1, 2, 3):
        jobs.record_step(record["id"], step, 1.0 / step, 1e-3)
    jobs.rewind(record["id"], 2)
    got = jobs.get(record["id"], "acme")
    assert got["progress"]["step"] == 2 and [h["step"] for h in got["loss_history"]] == [1, 2]
    jobs.finish(record["id"], "succeeded", adapter={"id": "a", "version": 3})
    got = jobs.get(record["id"], "acme")
    assert got["status"] == "succeeded" and got["adapter_version"] == 3 and got["finished_at"]


def test_cancel_queued_now_running_flagged_terminal_conflict(jobs):
    queued, _ = jobs.create(new_job())
    assert jobs.request_cancel(queued["id"], "acme")["status"] == "cancelled"
    running, _ = jobs.create(new_job())
    jobs.claim_next()
    flagged = jobs.request_cancel(running["id"], "acme")
    assert flagged["status"] == "running" and flagged["cancel_requested"]
    assert jobs.status(running["id"]) == ("running", True)
    with pytest.raises(Conflict):
        jobs.request_cancel(queued["id"], "acme")


def test_recover_requeues_then_fails_after_max_attempts(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    jobs = JobStore(path)
    record, _ = jobs.create(new_job())
    cancelled, _ = jobs.create(new_job())
    jobs.claim_next()
    jobs.claim_next()
    jobs.request_cancel(cancelled["id"], "acme")
    jobs.close()  # the process "dies" with both running

    for attempt in (1, 2):
        jobs = JobStore(path)
        assert record["id"] in jobs.recover(max_attempts=3)
        assert jobs.get(record["id"], "acme")["status"] == "queued"
        assert jobs.get(cancelled["id"], "acme")["status"] == "cancelled"  # a requested cancel wins
        assert jobs.claim_next() == (record["id"], "acme", "a", attempt + 1)
        jobs.close()
    jobs = JobStore(path)
    jobs.recover(max_attempts=3)
    got = jobs.get(record["id"], "acme")
    assert got["status"] == "failed" and "interrupted 3 times" in got["error"]
    assert len(jobs.list(None)) == 2  # nothing vanished, nothing duplicated
    jobs.close()


def test_requeue_refunds_attempt(jobs):
    record, _ = jobs.create(new_job())
    jobs.claim_next()
    jobs.requeue(record["id"], refund_attempt=True)
    got = jobs.get(record["id"], "acme")
    assert got["status"] == "queued" and got["attempts"] == 0

"""The job queue in the bucket (real moto on loopback), as two servers on two machines see it.

moto checks If-None-Match / If-Match and then writes, not atomically, so two
servers racing for one lease at the same instant could both win there (real S3
and MinIO do not let them). These tests therefore contend in turn, never in
parallel: what they check is the protocol, not moto's atomicity.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from server.adapters.store.object_store import ObjectStore, S3Options
from server.errors import Conflict, NotFound, StoreUnavailable
from server.training.jobs import NewJob
from server.settings import Settings
from server.training.s3_jobs import S3JobQueue
from tests.adapters.store.s3_moto import MotoS3, moto_s3

LEASE_S = 1.5
SKEW_S = 0.2


def new_job(tenant: str = "acme", key: str | None = None, body_hash: str = "h1", steps: int = 5) -> NewJob:
    return NewJob(tenant=tenant, adapter_id="a", spec_json='{"x": 1}', params={"rank": 8}, num_examples=1,
                  steps=steps, body_hash=body_hash, idempotency_key=key)


def queue(options: S3Options, max_attempts: int = 3) -> S3JobQueue:
    return S3JobQueue(ObjectStore(options), uuid.uuid4().hex, LEASE_S, SKEW_S, max_attempts)


@pytest.fixture
def pair(moto: MotoS3) -> Iterator[tuple[S3JobQueue, S3JobQueue]]:
    """Two servers' queues on one bucket: nothing shared but the bucket."""
    options = moto.new_bucket()
    a, b = queue(options), queue(options)
    yield a, b
    a.close()
    b.close()


def test_a_job_created_on_one_server_is_read_and_listed_on_the_other(pair) -> None:
    a, b = pair
    record, created = a.create(new_job())
    assert created and record["status"] == "queued" and record["progress"] == {"step": 0, "steps": 5}
    assert b.get(record["id"], "acme") == record
    assert [j["id"] for j in b.list("acme")] == [record["id"]] == [j["id"] for j in b.list(None)]
    assert b.spec_json(record["id"]) == '{"x": 1}'
    newer, _ = b.create(new_job())
    assert [j["id"] for j in a.list("acme")] == [newer["id"], record["id"]], "newest first"
    assert [j["id"] for j in a.list("acme", status="queued", limit=1)] == [newer["id"]]
    with pytest.raises(NotFound):
        b.get(record["id"], "zeta")  # another tenant: not found, as if it did not exist
    with pytest.raises(NotFound):
        b.request_cancel(record["id"], "zeta")
    with pytest.raises(NotFound):
        b.get("../../acme/x", None)
    assert b.list("zeta") == [] and b.get(record["id"], None)["tenant"] == "acme"
    assert a.count("queued") == 2 and b.pending()


def test_an_idempotency_key_holds_across_servers(pair) -> None:
    a, b = pair
    first, created = a.create(new_job(key="k1"))
    again, created_again = b.create(new_job(key="k1"))
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(Conflict):
        b.create(new_job(key="k1", body_hash="other"))
    other, created_other = b.create(new_job(tenant="zeta", key="k1", body_hash="other"))
    assert created_other and other["id"] != first["id"] and len(a.list(None)) == 2


def test_one_owner_runs_a_job_and_only_it_writes_progress(pair) -> None:
    a, b = pair
    record, _ = a.create(new_job())
    job_id = record["id"]
    assert b.claim_next() == (job_id, "acme", "a", 1)
    assert a.claim_next() is None, "its lease is live: the other server must not claim it"
    b.rewind(job_id, 0)
    for step, loss in ((1, 0.5), (2, 0.25)):
        b.record_step(job_id, step, loss, 1e-3)
    got = a.get(job_id, "acme")
    assert got["status"] == "running" and got["progress"]["step"] == 2 and got["loss"] == 0.25
    assert [h["step"] for h in got["loss_history"]] == [1, 2] and got["attempts"] == 1
    a.record_step(job_id, 3, 0.1, 1e-3)  # not the owner: nothing written
    a.finish(job_id, "failed", "not yours")
    assert b.get(job_id, "acme")["progress"]["step"] == 2 and b.get(job_id, "acme")["status"] == "running"
    b.rewind(job_id, 1)
    assert [h["step"] for h in a.get(job_id, "acme")["loss_history"]] == [1]
    b.finish(job_id, "succeeded", adapter={"id": "a", "version": 1})
    got = a.get(job_id, "acme")
    assert got["status"] == "succeeded" and got["adapter_version"] == 1 and got["finished_at"]
    assert a.claim_next() is None and not a.pending() and not b.pending()
    assert a.count("succeeded") == 1 and a.count("running") == 0


def test_a_cancel_through_another_server_reaches_the_owner(pair) -> None:
    a, b = pair
    queued, _ = a.create(new_job())
    assert b.request_cancel(queued["id"], "acme")["status"] == "cancelled"
    assert a.claim_next() is None, "a cancelled job is never claimed"
    running, _ = a.create(new_job())
    assert a.claim_next() is not None
    flagged = b.request_cancel(running["id"], "acme")
    assert flagged["status"] == "running" and flagged["cancel_requested"]
    assert a.status(running["id"]) == ("running", True)
    a.finish(running["id"], "cancelled")
    with pytest.raises(Conflict):
        b.request_cancel(running["id"], "acme")


def test_a_heartbeat_keeps_the_lease(pair) -> None:
    a, b = pair
    record, _ = a.create(new_job())
    assert a.claim_next() is not None
    deadline = time.monotonic() + LEASE_S + SKEW_S + 0.5
    while time.monotonic() < deadline:
        time.sleep(LEASE_S / 4)
        a.heartbeat()
        assert b.claim_next() is None
    assert a.holds(record["id"]) and a.holds(record["id"], fresh=True)


def test_an_abandoned_lease_expires_and_another_server_takes_the_job(pair) -> None:
    """The owner stops renewing (a dead machine): after the expiry another server requeues and runs it,
    counting the attempt; the stale owner can no longer write, and learns so at its next heartbeat."""
    a, b = pair
    record, _ = a.create(new_job())
    job_id = record["id"]
    assert a.claim_next() == (job_id, "acme", "a", 1)
    a.record_step(job_id, 1, 0.5, 1e-3)
    assert b.claim_next() is None
    time.sleep(LEASE_S + SKEW_S + 0.1)
    assert not a.holds(job_id), "the owner stops trusting its lease before anyone may take it"
    assert b.claim_next() == (job_id, "acme", "a", 2)
    assert not a.holds(job_id, fresh=True) and b.holds(job_id, fresh=True)
    a.leases._held[job_id].expires_at = time.time() + 60  # as if A's clock ran far behind the skew bound
    assert a.holds(job_id), "its clock says yes ..."
    assert not a.holds(job_id, fresh=True), "... but the conditional renewal before a publish says no"
    assert not a.holds(job_id), "and it is lost for good"
    a.finish(job_id, "succeeded", adapter={"id": "a", "version": 9})
    got = b.get(job_id, "acme")
    assert got["status"] == "running" and got["adapter_version"] is None and got["attempts"] == 2


def test_a_job_interrupted_too_often_fails(moto: MotoS3) -> None:
    options = moto.new_bucket()
    a, b = queue(options, max_attempts=1), queue(options, max_attempts=1)
    record, _ = a.create(new_job())
    assert a.claim_next() is not None
    time.sleep(LEASE_S + SKEW_S + 0.1)
    assert b.claim_next() is None
    got = b.get(record["id"], "acme")
    assert got["status"] == "failed" and "interrupted 1 times" in got["error"] and not b.pending()


def test_an_unreachable_bucket_is_store_unavailable() -> None:
    with moto_s3() as server:
        options = server.new_bucket()
        jobs = queue(S3Options(options.location, options.endpoint_url, options.region, timeout_s=0.5,
                               max_attempts=1))
        record, _ = jobs.create(new_job())
        server.stop()
        for call in (lambda: jobs.create(new_job()), lambda: jobs.get(record["id"], "acme"),
                     lambda: jobs.list("acme"), lambda: jobs.request_cancel(record["id"], "acme"),
                     jobs.claim_next, jobs.pending):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - started < 10.0
        jobs.heartbeat()  # holds nothing: nothing to do, no error
        server.start()
        assert jobs.get(record["id"], "acme")["status"] == "queued"


def test_the_clock_skew_must_stay_well_under_the_lease() -> None:
    """A lease renewed every third of its time must still be valid on its owner's clock minus the skew."""
    with pytest.raises(ValidationError, match="train_clock_skew_s"):
        Settings(train_lease_s=3.0, train_clock_skew_s=1.0)
    assert Settings(train_lease_s=3.0, train_clock_skew_s=0.5).train_lease_s == 3.0

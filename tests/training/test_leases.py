"""Owner leases: a replica's start-up requeues only the jobs of trainers that are gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from server.training.jobs import JobStore, NewJob
from server.training.leases import WorkerLease


def _job() -> NewJob:
    return NewJob(tenant="acme", adapter_id="a", spec_json="{}", params={}, num_examples=1, steps=5, body_hash="h")


def test_a_live_owners_running_job_is_left_alone_and_a_dead_ones_requeued(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    running, other = WorkerLease(tmp_path / "workers"), WorkerLease(tmp_path / "workers")
    record, _ = jobs.create(_job())
    assert jobs.claim_next(running.owner)[0] == record["id"]
    assert jobs.recover(3, other.owner_alive) == []  # another replica starting up: the owner lives
    assert jobs.get(record["id"], None)["status"] == "running"
    running.close()  # the owner's process ends (the kernel drops its flock)
    assert jobs.recover(3, other.owner_alive) == [record["id"]]
    assert jobs.get(record["id"], None)["status"] == "queued"
    other.close()
    jobs.close()


def test_an_owner_killed_with_sigkill_is_seen_dead(tmp_path):
    code = ("import sys, time; from pathlib import Path; from server.training.leases import WorkerLease; "
            f"lease = WorkerLease(Path({str(tmp_path / 'workers')!r})); print(lease.owner, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        owner = proc.stdout.readline().strip()
        me = WorkerLease(tmp_path / "workers")
        assert me.owner_alive(owner)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not me.owner_alive(owner) and not (tmp_path / "workers" / owner).exists()
        assert me.owner_alive(me.owner) and not me.owner_alive(None) and not me.owner_alive("../x")
        me.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_queue_from_before_owners_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter_id TEXT NOT NULL,"
                     " spec TEXT NOT NULL, params TEXT NOT NULL, num_examples INTEGER NOT NULL, status TEXT NOT NULL,"
                     " step INTEGER NOT NULL DEFAULT 0, steps INTEGER NOT NULL, error TEXT, attempts INTEGER NOT NULL"
                     " DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, idempotency_key TEXT, body_hash TEXT"
                     " NOT NULL, adapter_version INTEGER, adapter_record TEXT, created_at REAL NOT NULL,"
                     " started_at REAL, finished_at REAL);")
    db.close()
    jobs = JobStore(path)
    jobs.create(_job())
    assert jobs.claim_next("owner1") is not None
    assert jobs.recover(3) != []  # no owner alive: requeued
    jobs.close()

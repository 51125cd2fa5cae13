"""The durable job queue: one SQLite file (WAL) inside the store.

Why SQLite: a job row must survive kill -9 between any two statements, the
idempotency rule needs a unique index, and the routes (threadpool) and the
trainer (engine thread) touch it concurrently — one lock around one connection
is simple and each statement takes microseconds. Losses live in their own
table so a long job's history costs one small insert per step, not a rewrite.

States: queued → running → succeeded | failed | cancelled. A job that was
`running` when the process died goes back to `queued` on start-up (and
resumes from its checkpoint) until its attempts run out, then `failed`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import Conflict, NotFound
from server.training.leases import WorkerLease

TERMINAL = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    adapter_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    params TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    body_hash TEXT NOT NULL,
    adapter_version INTEGER,
    adapter_record TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS job_losses (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    loss REAL NOT NULL,
    lr REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""


def iso_utc(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def job_not_found(job_id: str) -> NotFound:
    return NotFound(f"training job {job_id!r} not found")


@dataclass(frozen=True)
class NewJob:
    tenant: str
    adapter_id: str
    spec_json: str  # the canonical spec (with data)
    params: dict[str, Any]  # the spec without data: what listings show
    num_examples: int
    steps: int
    body_hash: str
    idempotency_key: str | None = None


class JobStore:
    tick_s: float | None = None  # ownership is the owner's flock (leases.py): nothing to renew

    def __init__(self, path: Path, lease: WorkerLease | None = None) -> None:
        """`lease`: this process's owner id (closed with the store); None: claims name no owner (tests)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lease = lease
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:  # a queue written before jobs named their trainer
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")

    @property
    def owner(self) -> str | None:
        return self.lease.owner if self.lease is not None else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self.lease is not None:
            self.lease.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One serialised transaction (BEGIN IMMEDIATE: other processes on the file wait, not fail)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---------------------------------------------------------------- create
    def create(self, job: NewJob) -> tuple[dict[str, Any], bool]:
        """(record, created). Same tenant + idempotency key: the same job if the body matches, else 409."""
        with self._tx() as db:
            if job.idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE tenant=? AND idempotency_key=?",
                                 (job.tenant, job.idempotency_key)).fetchone()
                if row is not None:
                    if row["body_hash"] != job.body_hash:
                        raise Conflict("Idempotency-Key was already used with a different request body")
                    return self._record(db, row, history=True), False
            job_id = f"job-{uuid.uuid4().hex[:20]}"
            db.execute(
                "INSERT INTO jobs (id, tenant, adapter_id, spec, params, num_examples, status, steps,"
                " idempotency_key, body_hash, created_at) VALUES (?,?,?,?,?,?,'queued',?,?,?,?)",
                (job_id, job.tenant, job.adapter_id, job.spec_json, json.dumps(job.params), job.num_examples,
                 job.steps, job.idempotency_key, job.body_hash, time.time()))
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._record(db, row, history=True), True

    # ------------------------------------------------------------------ read
    def get(self, job_id: str, tenant: str | None, history: bool = True) -> dict[str, Any]:
        """A job's record; `tenant=None` is an admin's view. Another tenant's job is 404."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise job_not_found(job_id)
            return self._record(self._db, row, history=history)

    def list(self, tenant: str | None, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if tenant is not None:
            query, args = query + " AND tenant=?", [*args, tenant]
        if status is not None:
            query, args = query + " AND status=?", [*args, status]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY rowid DESC LIMIT ?", (*args, limit)).fetchall()
            return [self._record(self._db, r, history=False) for r in rows]

    def spec_json(self, job_id: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT spec FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise job_not_found(job_id)
        return str(row["spec"])

    def status(self, job_id: str) -> tuple[str, bool]:
        """(status, cancel requested): the trainer asks this once per step."""
        with self._lock:
            row = self._db.execute("SELECT status, cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise job_not_found(job_id)
        return str(row["status"]), bool(row["cancel_requested"])

    def count(self, status: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0])

    def pending(self) -> bool:
        return self.count("queued") > 0

    def holds(self, job_id: str, fresh: bool = False) -> bool:
        """The row still runs under our owner id (the flock cannot expire while we live)."""
        with self._lock:
            row = self._db.execute("SELECT status, owner FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row is not None and row["status"] == "running" and row["owner"] == self.owner

    def abandon(self, job_id: str) -> None:
        """Nothing to let go of: an owner's row is only ever taken from a dead process."""

    def heartbeat(self) -> None:
        """Nothing to renew: the kernel holds the owner's flock for as long as the process lives."""

    def _record(self, db: sqlite3.Connection, row: sqlite3.Row, history: bool) -> dict[str, Any]:
        losses = db.execute("SELECT step, loss, lr FROM job_losses WHERE job_id=? ORDER BY step",
                            (row["id"],)).fetchall() if history else []
        last = db.execute("SELECT loss FROM job_losses WHERE job_id=? ORDER BY step DESC LIMIT 1",
                          (row["id"],)).fetchone()
        record: dict[str, Any] = {
            "id": row["id"], "tenant": row["tenant"], "adapter_id": row["adapter_id"], "status": row["status"],
            "progress": {"step": row["step"], "steps": row["steps"]},
            "loss": None if last is None else last["loss"],
            "error": row["error"], "attempts": row["attempts"], "cancel_requested": bool(row["cancel_requested"]),
            "num_examples": row["num_examples"], "params": json.loads(row["params"]),
            "adapter_version": row["adapter_version"],
            "adapter": json.loads(row["adapter_record"]) if row["adapter_record"] else None,
            "created_at": iso_utc(row["created_at"]), "started_at": iso_utc(row["started_at"]),
            "finished_at": iso_utc(row["finished_at"]),
        }
        if history:
            record["loss_history"] = [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in losses]
        return record

    # ------------------------------------------------------------ lifecycle
    def claim_next(self, owner: str | None = None) -> tuple[str, str, str, int] | None:
        """Oldest queued job → running under `owner` (server/training/leases.py), attempts + 1:
        (id, tenant, adapter_id, attempts). One transaction: two processes never claim one job."""
        with self._tx() as db:
            row = db.execute("SELECT id, tenant, adapter_id, attempts FROM jobs WHERE status='queued'"
                             " ORDER BY rowid LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status='running', attempts=attempts+1, started_at=COALESCE(started_at, ?),"
                       " owner=? WHERE id=?", (time.time(), owner, row["id"]))
            return row["id"], row["tenant"], row["adapter_id"], row["attempts"] + 1

    def record_step(self, job_id: str, step: int, loss: float, lr: float) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO job_losses (job_id, step, loss, lr) VALUES (?,?,?,?)",
                       (job_id, step, loss, lr))
            db.execute("UPDATE jobs SET step=? WHERE id=?", (step, job_id))

    def rewind(self, job_id: str, step: int) -> None:
        """Resuming from a checkpoint at `step`: later progress is redone, so forget it."""
        with self._tx() as db:
            db.execute("DELETE FROM job_losses WHERE job_id=? AND step>?", (job_id, step))
            db.execute("UPDATE jobs SET step=? WHERE id=?", (step, job_id))

    def finish(self, job_id: str, status: str, error: str | None = None,
               adapter: dict[str, Any] | None = None) -> None:
        assert status in TERMINAL
        with self._tx() as db:
            db.execute("UPDATE jobs SET status=?, error=?, adapter_record=?, adapter_version=?, finished_at=?"
                       " WHERE id=?", (status, error, json.dumps(adapter) if adapter else None,
                                       adapter.get("version") if adapter else None, time.time(), job_id))

    def requeue(self, job_id: str, refund_attempt: bool) -> None:
        """Back to queued (graceful shutdown mid-job: the interruption is not the job's fault)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status='queued', attempts=MAX(0, attempts-?) WHERE id=? AND status='running'",
                       (1 if refund_attempt else 0, job_id))

    def request_cancel(self, job_id: str, tenant: str | None) -> dict[str, Any]:
        """Queued: cancelled now. Running: flagged; the trainer stops before its next step."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise job_not_found(job_id)
            if row["status"] in TERMINAL:
                raise Conflict(f"training job {job_id!r} already {row['status']}")
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status='cancelled', cancel_requested=1, finished_at=? WHERE id=?",
                           (time.time(), job_id))
            else:
                db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._record(db, row, history=True)

    def recover(self, max_attempts: int, owner_alive: Callable[[str | None], bool] = lambda owner: False) -> list[str]:
        """Start-up: jobs left `running` by a dead process are requeued, or failed when out of attempts;
        jobs whose owner still lives (another replica on this queue) are left alone.

        A cancel requested before the crash wins: such a job ends cancelled.
        """
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, cancel_requested, owner FROM jobs WHERE status='running'").fetchall()
            rows = [row for row in rows if not owner_alive(row["owner"])]
            for row in rows:
                if row["cancel_requested"]:
                    db.execute("UPDATE jobs SET status='cancelled', finished_at=? WHERE id=?", (now, row["id"]))
                elif row["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET status='failed', finished_at=?, error=? WHERE id=?",
                               (now, f"interrupted {row['attempts']} times (server restarts); giving up",
                                row["id"]))
                else:
                    db.execute("UPDATE jobs SET status='queued' WHERE id=?", (row["id"],))
            return [r["id"] for r in rows]

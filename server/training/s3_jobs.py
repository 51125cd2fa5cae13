"""The job queue in the `--s3-store` bucket: one queue for servers on several machines.

    <prefix>/.jobs/<job_id>/job.json        the record; every change is a compare-and-swap (If-Match)
    <prefix>/.jobs/<job_id>/spec.json       the canonical spec with its data, written once
    <prefix>/.jobs/<job_id>/lease.json      who runs it, until when (s3_leases.py)
    <prefix>/.jobs/<job_id>/losses/<n>.json loss history, LOSS_CHUNK steps an object, written by the owner
    <prefix>/.jobs/.open/<job_id>           queued or running: what trainers look at for work
    <prefix>/.jobs/.tenants/<tenant>/<id>   a tenant's jobs, listed by prefix
    <prefix>/.jobs/.idem/<tenant>/<sha256>  an Idempotency-Key: {"job_id", "body_hash"}, If-None-Match

Exactly once: a trainer first takes the job's lease (s3_leases.py), then moves
the record to `running` by a CAS; an expired lease on a `running` record means
its owner died, and the taker counts the attempt as SQLite's recover() does.
A cancel is a CAS on the record that the owner reads at its next step. Ids
start with the creation time in hex, so listing by key is listing by age.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.adapters.store.object_store import ObjectStore, PreconditionFailed
from server.errors import Conflict, StoreUnavailable
from server.training.jobs import TERMINAL, NewJob, iso_utc, job_not_found
from server.training.s3_leases import LeaseBook

log = logging.getLogger(__name__)

JOBS_DIR = ".jobs"
ID_RE = re.compile(r"^job-[0-9a-f]{20}$")
LOSS_CHUNK = 256
CAS_ATTEMPTS = 8
READ_WORKERS = 8
PRIVATE = ("body_hash", "idempotency_key", "owner", "created_ts", "started_ts", "finished_ts", "loss")


def new_job_id() -> str:
    """`job-` + milliseconds since the epoch (11 hex digits) + 9 random ones: key order is age order."""
    return f"job-{int(time.time() * 1000):011x}{uuid.uuid4().hex[:9]}"


class S3JobQueue:
    def __init__(self, objects: ObjectStore, owner: str, lease_s: float, skew_s: float, max_attempts: int) -> None:
        self.objects = objects
        self.root = objects.location.key(JOBS_DIR)
        self.leases = LeaseBook(objects, self.root, owner, lease_s, skew_s)
        self.max_attempts = max_attempts
        self.tick_s: float | None = lease_s / 3
        self._terminal: dict[str, dict[str, Any]] = {}  # finished records never change: read once
        self._chunks: dict[str, tuple[int, list[list[float]]]] = {}  # the owner's current loss chunk
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="s3-jobs")

    @property
    def owner(self) -> str:
        return self.leases.owner

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ keys
    def _key(self, job_id: str, name: str) -> str:
        return f"{self.root}/{job_id}/{name}"

    def _open_key(self, job_id: str) -> str:
        return f"{self.root}/.open/{job_id}"

    def _loss_key(self, job_id: str, chunk: int) -> str:
        return self._key(job_id, f"losses/{chunk:06d}.json")

    # ----------------------------------------------------------------- records
    def _read(self, job_id: str) -> tuple[dict[str, Any], str] | None:
        got = self.objects.get(self._key(job_id, "job.json"))
        return None if got is None else (json.loads(got[0]), got[1])

    def _raw(self, job_id: str) -> dict[str, Any] | None:
        with self._guard:
            done = self._terminal.get(job_id)
        if done is not None:
            return done
        got = self._read(job_id)
        if got is not None and got[0]["status"] in TERMINAL:
            with self._guard:
                self._terminal[job_id] = got[0]
        return None if got is None else got[0]

    def _update(self, job_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Read, change, write back If-Match; again when another server wrote meanwhile. `change` returns
        None when there is nothing to write."""
        for _ in range(CAS_ATTEMPTS):
            got = self._read(job_id)
            if got is None:
                raise job_not_found(job_id)
            new = change(dict(got[0]))
            if new is None:
                return got[0]
            try:
                self.objects.put(self._key(job_id, "job.json"), json.dumps(new).encode(), if_match=got[1])
                return new
            except PreconditionFailed:
                continue
        raise StoreUnavailable(f"training job {job_id!r} is being changed by other servers; retry")

    def _public(self, raw: dict[str, Any], history: bool) -> dict[str, Any]:
        record = {k: v for k, v in raw.items() if k not in PRIVATE}
        record.update(loss=raw.get("loss"), created_at=iso_utc(raw["created_ts"]),
                      started_at=iso_utc(raw["started_ts"]), finished_at=iso_utc(raw["finished_ts"]))
        if history:
            record["loss_history"] = [{"step": int(s), "loss": loss, "lr": lr}
                                      for s, loss, lr in self._losses(raw["id"])]
        return record

    def _losses(self, job_id: str) -> list[list[float]]:
        keys = sorted(self.objects.keys(self._key(job_id, "losses")))
        chunks = self._pool.map(lambda k: self.objects.get(k), keys)
        return [row for got in chunks if got is not None for row in json.loads(got[0])]

    # ------------------------------------------------------------------ create
    def create(self, job: NewJob) -> tuple[dict[str, Any], bool]:
        job_id = new_job_id()
        if job.idempotency_key is not None:
            key = hashlib.sha256(job.idempotency_key.encode()).hexdigest()[:40]
            idem = f"{self.root}/.idem/{job.tenant}/{key}"
            try:
                self.objects.put(idem, json.dumps({"job_id": job_id, "body_hash": job.body_hash}).encode(),
                                 if_absent=True)
            except PreconditionFailed:
                got = self.objects.get(idem)
                first = json.loads(got[0]) if got is not None else {}
                if first.get("body_hash") != job.body_hash:
                    raise Conflict("Idempotency-Key was already used with a different request body") from None
                job_id = first["job_id"]
                existing = self._raw(job_id)
                if existing is not None:
                    return self._public(existing, history=True), False
                # The first request died before writing its job: finish creating it under that id.
        now = time.time()
        raw = {"id": job_id, "tenant": job.tenant, "adapter_id": job.adapter_id, "status": "queued",
               "progress": {"step": 0, "steps": job.steps}, "error": None, "attempts": 0,
               "cancel_requested": False, "num_examples": job.num_examples, "params": job.params,
               "adapter_version": None, "adapter": None, "loss": None, "body_hash": job.body_hash,
               "idempotency_key": job.idempotency_key, "owner": None, "created_ts": now, "started_ts": None,
               "finished_ts": None}
        self.objects.put(self._key(job_id, "spec.json"), job.spec_json.encode())
        try:
            self.objects.put(self._key(job_id, "job.json"), json.dumps(raw).encode(), if_absent=True)
        except PreconditionFailed:
            return self._public(self._raw(job_id) or raw, history=True), False
        self.objects.put(f"{self.root}/.tenants/{job.tenant}/{job_id}", b"")
        self.objects.put(self._open_key(job_id), b"")  # last: claimable once everything else is there
        return self._public(raw, history=True), True

    # -------------------------------------------------------------------- read
    def get(self, job_id: str, tenant: str | None, history: bool = True) -> dict[str, Any]:
        raw = self._raw(job_id) if ID_RE.fullmatch(job_id) else None
        if raw is None or (tenant is not None and raw["tenant"] != tenant):
            raise job_not_found(job_id)
        return self._public(raw, history)

    def _ids(self, tenant: str | None) -> list[str]:
        """Newest first."""
        if tenant is not None:
            ids = [k.rsplit("/", 1)[1] for k in self.objects.keys(f"{self.root}/.tenants/{tenant}")]
        else:
            ids = self.objects.children(self.root)
        return sorted((i for i in ids if ID_RE.fullmatch(i)), reverse=True)

    def list(self, tenant: str | None, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        ids, out = self._ids(tenant), []
        for start in range(0, len(ids), READ_WORKERS * 4):
            for raw in self._pool.map(self._raw, ids[start:start + READ_WORKERS * 4]):
                if raw is not None and (status is None or raw["status"] == status):
                    out.append(self._public(raw, history=False))
            if len(out) >= limit:
                break
        return out[:limit]

    def spec_json(self, job_id: str) -> str:
        got = self.objects.get(self._key(job_id, "spec.json"))
        if got is None:
            raise job_not_found(job_id)
        return got[0].decode()

    def status(self, job_id: str) -> tuple[str, bool]:
        got = self._read(job_id)
        if got is None:
            raise job_not_found(job_id)
        return str(got[0]["status"]), bool(got[0]["cancel_requested"])

    def count(self, status: str) -> int:
        """Open jobs are re-read; finished ones come from memory after their first read."""
        ids = self._open_ids() if status not in TERMINAL else self._ids(None)
        return sum(1 for raw in self._pool.map(self._raw, ids) if raw is not None and raw["status"] == status)

    def _open_ids(self) -> list[str]:
        return sorted(i for i in (k.rsplit("/", 1)[1] for k in self.objects.keys(f"{self.root}/.open"))
                      if ID_RE.fullmatch(i))

    def pending(self) -> bool:
        held = self.leases.held_ids()
        return any(i not in held for i in self._open_ids())

    # --------------------------------------------------------------- lifecycle
    def claim_next(self, owner: str | None = None) -> tuple[str, str, str, int] | None:
        """The oldest open job whose lease is free or expired, now running under our lease."""
        held = self.leases.held_ids()
        for job_id in self._open_ids():
            if job_id in held:
                continue
            raw = self._raw(job_id)
            if raw is None:
                continue  # its creation is still writing
            if raw["status"] in TERMINAL:
                self.objects.delete([self._open_key(job_id)])  # its finisher died before removing it
                continue
            if not self.leases.take(job_id):
                continue
            try:
                raw = self._update(job_id, self._start)
            except BaseException:
                self.leases.release(job_id)
                raise
            if raw["status"] == "running" and raw["owner"] == self.owner:
                return job_id, raw["tenant"], raw["adapter_id"], int(raw["attempts"])
            self.leases.release(job_id)  # cancelled meanwhile, or out of attempts
            if raw["status"] in TERMINAL:
                self.objects.delete([self._open_key(job_id)])
        return None

    def _start(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """Under a fresh lease: queued → running; running (its owner's lease expired) → the attempt counted,
        then cancelled if asked, failed when out of attempts, else running again here."""
        now = time.time()
        if raw["status"] in TERMINAL:
            return None
        if raw["status"] == "running" and raw["cancel_requested"]:
            return {**raw, "status": "cancelled", "finished_ts": now}
        if raw["status"] == "running" and raw["attempts"] >= self.max_attempts:
            return {**raw, "status": "failed", "finished_ts": now,
                    "error": f"interrupted {raw['attempts']} times (servers lost); giving up"}
        return {**raw, "status": "running", "attempts": raw["attempts"] + 1, "owner": self.owner,
                "started_ts": raw["started_ts"] or now}

    def holds(self, job_id: str, fresh: bool = False) -> bool:
        return self.leases.holds(job_id, fresh)

    def abandon(self, job_id: str) -> None:
        """The worker dropped the job (its lease was lost, or looked so): stop renewing and writing."""
        with self._guard:
            self._chunks.pop(job_id, None)
        self.leases.forget(job_id)

    def heartbeat(self) -> None:
        self.leases.renew()

    def _mine(self, job_id: str) -> bool:
        if not self.leases.holds(job_id):
            log.warning("training job %s: not written (this server no longer holds its lease)", job_id)
            return False
        return True

    def record_step(self, job_id: str, step: int, loss: float, lr: float) -> None:
        if not self._mine(job_id):
            return
        n = (step - 1) // LOSS_CHUNK
        with self._guard:
            chunk, rows = self._chunks.get(job_id, (n, []))
            rows = [r for r in rows if r[0] < step] if chunk == n else []
            rows.append([step, loss, lr])
            self._chunks[job_id] = (n, rows)
        self.objects.put(self._loss_key(job_id, n), json.dumps(rows).encode())
        self._update(job_id, lambda raw: {**raw, "progress": {**raw["progress"], "step": step}, "loss": loss})

    def rewind(self, job_id: str, step: int) -> None:
        """Resuming at `step` (0 on a server without the checkpoint): later history is redone, so dropped."""
        if not self._mine(job_id):
            return
        keep = max(step - 1, 0) // LOSS_CHUNK
        stale = [k for k in self.objects.keys(self._key(job_id, "losses"))
                 if int(k.rsplit("/", 1)[1].split(".")[0]) > keep or step == 0]
        self.objects.delete(stale)
        got = self.objects.get(self._loss_key(job_id, keep)) if step > 0 else None
        rows = [r for r in json.loads(got[0]) if r[0] <= step] if got is not None else []
        if rows:
            self.objects.put(self._loss_key(job_id, keep), json.dumps(rows).encode())
        with self._guard:
            self._chunks[job_id] = (keep, rows)
        last = rows[-1][1] if rows else None
        self._update(job_id, lambda raw: {**raw, "progress": {**raw["progress"], "step": step}, "loss": last})

    def finish(self, job_id: str, status: str, error: str | None = None,
               adapter: dict[str, Any] | None = None) -> None:
        assert status in TERMINAL
        if not self._mine(job_id):
            return

        def end(raw: dict[str, Any]) -> dict[str, Any] | None:
            if raw["status"] != "running" or raw["owner"] != self.owner:
                return None
            return {**raw, "status": status, "error": error, "adapter": adapter, "finished_ts": time.time(),
                    "adapter_version": adapter.get("version") if adapter else None}

        self._update(job_id, end)
        self._close_job(job_id)

    def _close_job(self, job_id: str) -> None:
        with self._guard:
            self._chunks.pop(job_id, None)
        self.leases.release(job_id)
        self.objects.delete([self._open_key(job_id)])

    def requeue(self, job_id: str, refund_attempt: bool) -> None:
        """Back to queued (graceful shutdown): the lease is dropped, so another server may take it at once."""
        try:
            if self._mine(job_id):
                self._update(job_id, lambda raw: None if raw["status"] != "running" or raw["owner"] != self.owner
                             else {**raw, "status": "queued", "owner": None,
                                   "attempts": max(0, raw["attempts"] - (1 if refund_attempt else 0))})
        finally:  # an unreachable store: the lease is no longer renewed, so it runs out and is taken over
            with self._guard:
                self._chunks.pop(job_id, None)
            self.leases.release(job_id)

    def request_cancel(self, job_id: str, tenant: str | None) -> dict[str, Any]:
        """Queued: cancelled now. Running: flagged; its owner, on whichever server, stops before its next step."""
        self.get(job_id, tenant, history=False)  # 404 (no tenant leak) before any write

        def cancel(raw: dict[str, Any]) -> dict[str, Any]:
            if raw["status"] in TERMINAL:
                raise Conflict(f"training job {job_id!r} already {raw['status']}")
            if raw["status"] == "queued":
                return {**raw, "status": "cancelled", "cancel_requested": True, "finished_ts": time.time()}
            return {**raw, "cancel_requested": True}

        raw = self._update(job_id, cancel)
        if raw["status"] in TERMINAL:
            self.objects.delete([self._open_key(job_id)])
        return self._public(raw, history=True)

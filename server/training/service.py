"""The route-facing side of training: validate, queue, read, cancel; and wiring into the app.

Submission does every check that can fail *before* the row is written
(settings limits, target modules against the served model, each example's
token count), so a 422 never leaves a job behind. Files: the queue database
and checkpoints live under `<store>/.training/` (a dot name: never mistaken
for a tenant by the adapter store); with `--s3-store` the queue is in the
bucket instead (s3_jobs.py), and a heartbeat thread here renews its leases.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Protocol

from server.adapters.service import AdapterService
from server.errors import ApiError, InvalidRequest
from server.model.load import BaseModel
from server.settings import Settings
from server.training.data import tokenize_all
from server.training.job_protocol import JobQueue
from server.training.jobs import JobStore, NewJob
from server.training.leases import WorkerLease
from server.training.modules import plan_targets
from server.training.spec import TrainingJobSpec, check_spec
from server.training.worker import TrainingWorker

log = logging.getLogger(__name__)

TRAINING_DIR = ".training"
DB_NAME = "jobs.sqlite3"
WORKERS_DIR = "workers"
MAX_IDEMPOTENCY_KEY = 255


class Waker(Protocol):
    """The engine loop, woken when a job is queued or cancelled (server.engine.loop.EngineLoop)."""

    def wake(self) -> None: ...


def open_local_queue(settings: Settings) -> JobStore:
    """The SQLite queue in `<store>/.training/`, its jobs left running by dead processes requeued."""
    root = Path(settings.store) / TRAINING_DIR
    lease = WorkerLease(root / WORKERS_DIR)  # before recovering: a replica starting later sees us live
    jobs = JobStore(root / DB_NAME, lease)
    recovered = jobs.recover(settings.train_max_attempts, lease.owner_alive)
    if recovered:
        log.info("training jobs interrupted by the last shutdown: %s", recovered)
    return jobs


class TrainingService:
    def __init__(self, settings: Settings, base: BaseModel, adapters: AdapterService,
                 loop: Waker | None = None, queue: JobQueue | None = None) -> None:
        """`loop`: the engine loop that runs the worker's steps; None = nobody to wake (tests).
        `queue`: where jobs live (job_protocol.py); None = the local SQLite queue."""
        self.settings = settings
        self.base = base
        root = Path(settings.store) / TRAINING_DIR
        self.jobs: JobQueue = queue if queue is not None else open_local_queue(settings)
        self.worker = TrainingWorker(self.jobs, base, adapters, settings, root / "checkpoints", self.jobs.owner)
        self.loop = loop
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.jobs.tick_s is not None:
            self._ticker = threading.Thread(target=self._tick, args=(self.jobs.tick_s,), daemon=True,
                                            name="training-lease")
            self._ticker.start()

    def _tick(self, every_s: float) -> None:
        """Renew this server's leases and look for jobs other servers queued, until closed."""
        while not self._stop.wait(every_s):
            try:
                self.jobs.heartbeat()
                self.poll()
            except ApiError as e:  # the store is unreachable: the next tick tries again
                log.warning("training queue: %s", e.message)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive one bad answer
                log.exception("training queue heartbeat failed")

    # ------------------------------------------------------------- routes
    def submit(self, spec: TrainingJobSpec, tenant: str, idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
        """(job record, created): 422 on anything the job could not run with, 409 on a reused key."""
        if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
            raise InvalidRequest(f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY} characters")
        self.validate(spec)
        params = spec.model_dump(mode="json", exclude={"data"})
        params["alpha"] = spec.lora_alpha
        record, created = self.jobs.create(NewJob(
            tenant=tenant, adapter_id=spec.adapter_id, spec_json=spec.canonical_json(), params=params,
            num_examples=len(spec.data), steps=spec.steps, body_hash=spec.body_hash(),
            idempotency_key=idempotency_key))
        if created:
            self.worker.notify()
            if self.loop is not None:
                self.loop.wake()
        return record, created

    def poll(self) -> None:
        """Another process sharing the queue (a cluster replica) may have queued a job: look again,
        so an idle trainer here claims it instead of it waiting for the busy one it was posted to."""
        if self.worker.active_job_id is None and self.jobs.pending():
            self.worker.notify()
            if self.loop is not None:
                self.loop.wake()

    def validate(self, spec: TrainingJobSpec) -> None:
        check_spec(spec, self.settings)
        plan_targets(self.base.model, spec)
        max_tokens = min(self.settings.max_train_tokens_per_example, self.base.max_context)
        tokenize_all(spec.data, self.base.tokenizer, max_tokens)

    def get(self, job_id: str, tenant: str | None) -> dict[str, Any]:
        return self.jobs.get(job_id, tenant)

    def list(self, tenant: str | None, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return self.jobs.list(tenant, status, limit)

    def cancel(self, job_id: str, tenant: str | None) -> dict[str, Any]:
        record = self.jobs.request_cancel(job_id, tenant)
        if self.loop is not None:
            self.loop.wake()
        return record

    def close(self) -> None:
        """Shutdown hook (after the engine thread stopped): persist the running job, close the file."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=30)
        try:
            self.worker.shutdown()
        finally:
            self.jobs.close()


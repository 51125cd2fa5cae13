"""The route-facing side of training: validate, queue, read, cancel; and wiring into the app.

Submission does every check that can fail *before* the row is written
(settings limits, target modules against the served model, each example's
token count), so a 422 never leaves a job behind. Files: the queue database
and checkpoints live under `<store>/.training/` (a dot name: never mistaken
for a tenant by the adapter store).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from server.adapters.service import AdapterService
from server.errors import InvalidRequest
from server.model.load import BaseModel
from server.settings import Settings
from server.training.data import tokenize_all
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


class TrainingService:
    def __init__(self, settings: Settings, base: BaseModel, adapters: AdapterService,
                 loop: Waker | None = None) -> None:
        """`loop`: the engine loop that runs the worker's steps; None = nobody to wake (tests)."""
        self.settings = settings
        self.base = base
        root = Path(settings.store) / TRAINING_DIR
        self.jobs = JobStore(root / DB_NAME)
        self.lease = WorkerLease(root / WORKERS_DIR)  # before recovering: a replica starting later sees us live
        recovered = self.jobs.recover(settings.train_max_attempts, self.lease.owner_alive)
        if recovered:
            log.info("training jobs interrupted by the last shutdown: %s", recovered)
        self.worker = TrainingWorker(self.jobs, base, adapters, settings, root / "checkpoints", self.lease.owner)
        self.loop = loop

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
        if self.jobs.count("queued"):
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
        try:
            self.worker.shutdown()
        finally:
            self.jobs.close()
            self.lease.close()


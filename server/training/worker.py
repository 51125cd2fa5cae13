"""The engine-thread side of training: one job at a time, one micro-batch per call.

The engine calls `has_work()` / `run_one_step()` between serving steps (always
when idle, at least every `train_interleave_steps` serving steps when busy),
so the model is only ever touched by the engine thread and a training slice
is never longer than one micro-batch. Each call first reads the job's cancel
flag, so a cancel takes effect before the next step.

Crash safety: progress rows are written after every optimizer step and a
checkpoint every `train_checkpoint_every` steps (and once more before
publishing). A job killed mid-run resumes from its checkpoint on the next
start; one killed between publishing and its final row update is recognised
by the `training_job` field of the newest version and not published twice.

Ownership: each step first checks the job is still ours (with the queue in a
bucket, another server takes a job whose lease ran out), and publishing asks
the store itself; a worker that lost its job drops it, writing nothing. A job
store that does not answer pauses training (STORE_RETRY_S) instead of failing
the job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapters.service import AdapterService
from server.errors import StoreUnavailable
from server.model.load import BaseModel
from server.settings import Settings
from server.training.data import tokenize_all
from server.training.job_protocol import JobQueue
from server.training.spec import TrainingJobSpec
from server.training.trainer import Trainer

log = logging.getLogger(__name__)

STORE_RETRY_S = 2.0  # a job store that did not answer: training pauses this long, then tries again


class LeaseLost(Exception):
    """Another server took the job over (our lease expired): stop, write nothing, publish nothing."""


@dataclass
class ActiveJob:
    id: str
    tenant: str
    adapter_id: str
    spec: TrainingJobSpec
    trainer: Trainer
    checkpoints: Path


class TrainingWorker:
    def __init__(self, jobs: JobQueue, base: BaseModel, adapters: AdapterService, settings: Settings,
                 checkpoint_root: Path, owner: str | None = None) -> None:
        """`adapters` publishes the output as an upload is published (validated, old files collected);
        `owner`: the lease id claimed jobs are recorded under (server/training/leases.py)."""
        self.owner = owner
        self.jobs = jobs
        self.base = base
        self.adapters = adapters
        self.settings = settings
        self.checkpoint_root = checkpoint_root
        self._job: ActiveJob | None = None
        self._pending = threading.Event()  # set: the queue may hold a job
        self._pending.set()
        self._lock = threading.Lock()  # run_one_step vs. shutdown
        self._closed = False
        self._paused_until = 0.0  # monotonic: the job store did not answer; wait before the next call

    # ------------------------------------------------------- any thread
    def notify(self) -> None:
        """A job was queued (called after the row is committed)."""
        self._pending.set()

    def has_work(self) -> bool:
        if self._closed or time.monotonic() < self._paused_until:
            return False
        return self._job is not None or self._pending.is_set()

    @property
    def active_job_id(self) -> str | None:
        job = self._job
        return job.id if job is not None else None

    def shutdown(self) -> None:
        """Graceful stop: checkpoint the running job if between steps, and queue it for the next start."""
        with self._lock:
            self._closed = True
            job, self._job = self._job, None
            if job is None:
                return
            try:
                if job.trainer.micro == 0 and job.trainer.step > 0:
                    job.trainer.save_checkpoint(job.checkpoints)
            finally:
                self.jobs.requeue(job.id, refund_attempt=True)
                log.info("training job %s requeued at shutdown (step %d)", job.id, job.trainer.step)

    # ---------------------------------------------------- engine thread
    def run_one_step(self) -> None:
        with self._lock:
            if self._closed:
                return
            job = self._job
            try:
                self._step(job)
            except StoreUnavailable:
                log.warning("training paused %.0fs: the job store did not answer", STORE_RETRY_S)
                self._paused_until = time.monotonic() + STORE_RETRY_S
                self._pending.set()
            except LeaseLost:
                assert job is not None
                log.warning("training job %s: stopped here, another server owns it now", job.id)
                self.jobs.abandon(job.id)
                self._job = None
                shutil.rmtree(job.checkpoints, ignore_errors=True)

    def _step(self, job: ActiveJob | None) -> None:
        """Claim a job or advance the one running; an unreachable store or a lost lease is the caller's."""
        if job is None:
            self._start_next()
            return
        try:
            self._advance(job)
        except (StoreUnavailable, LeaseLost):
            raise
        except Exception as exc:  # noqa: BLE001 - a failing job must not take the engine down
            log.exception("training job %s failed", job.id)
            self._end(job, "failed", f"training failed: {type(exc).__name__}: {exc}")

    def _start_next(self) -> None:
        self._pending.clear()  # cleared before the query: a submit racing with it sets it again
        claimed = self.jobs.claim_next(self.owner)
        if claimed is None:
            return
        self._pending.set()  # there may be more behind this one
        job_id, tenant, adapter_id, attempts = claimed
        log.info("training job %s starting (attempt %d)", job_id, attempts)
        try:
            self._job = self._open(job_id, tenant, adapter_id)
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):  # else its lease runs out and it is taken over
                self.jobs.requeue(job_id, refund_attempt=True)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a spec that no longer fits the served model
            log.exception("training job %s could not start", job_id)
            self.jobs.finish(job_id, "failed", f"could not start: {type(exc).__name__}: {exc}")
            shutil.rmtree(self.checkpoint_root / job_id, ignore_errors=True)

    def _open(self, job_id: str, tenant: str, adapter_id: str) -> ActiveJob:
        spec = TrainingJobSpec.model_validate_json(self.jobs.spec_json(job_id))
        tok = self.base.tokenizer
        max_tokens = min(self.settings.max_train_tokens_per_example, self.base.max_context)
        examples = tokenize_all(spec.data, tok, max_tokens)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        trainer = Trainer(self.base.model, spec, examples, pad_id, self.base.device, self.base.dtype)
        checkpoints = self.checkpoint_root / job_id
        if trainer.load_checkpoint(checkpoints):
            log.info("training job %s resumes from step %d", job_id, trainer.step)
        self.jobs.rewind(job_id, trainer.step)
        return ActiveJob(job_id, tenant, adapter_id, spec, trainer, checkpoints)

    def _advance(self, job: ActiveJob) -> None:
        _, cancel = self.jobs.status(job.id)
        if not self.jobs.holds(job.id):
            raise LeaseLost(job.id)
        if cancel:
            self._end(job, "cancelled", None)
            return
        trainer = job.trainer
        if not trainer.done:
            result = trainer.micro_step()
            if result is None:
                return
            if not math.isfinite(result.loss):
                self._end(job, "failed", f"loss became {result.loss} at step {result.step}; "
                                         "try a lower learning_rate")
                return
            self.jobs.record_step(job.id, result.step, result.loss, result.lr)
            if not trainer.done and result.step % self.settings.train_checkpoint_every == 0:
                trainer.save_checkpoint(job.checkpoints)
            if not trainer.done:
                return
            trainer.save_checkpoint(job.checkpoints)  # a crash while publishing must not retrain
        record = self._publish(job)
        self._end(job, "succeeded", None, record)

    def _publish(self, job: ActiveJob) -> dict[str, Any]:
        """Register the output as the newest version of tenant/adapter_id (once, even across a crash)."""
        existing = self._already_published(job)
        if existing is not None:
            return existing
        if not self.jobs.holds(job.id, fresh=True):  # a stale owner must never publish
            raise LeaseLost(job.id)
        with self.adapters.staging() as staged:
            job.trainer.save_output(staged, self.base.model_id)
            # The serving side's own validator: what it refuses, we must not publish.
            stored = self.adapters.publish(job.tenant, job.adapter_id, staged, {"training_job": job.id})
        log.info("training job %s published %s", job.id, stored.ref.key)
        return dict(stored.record)

    def _already_published(self, job: ActiveJob) -> dict[str, Any] | None:
        try:
            stored = self.adapters.get(job.tenant, job.adapter_id)
        except Exception:  # noqa: BLE001 - NotFound: nothing published yet
            return None
        return dict(stored.record) if stored.record.get("training_job") == job.id else None

    def _end(self, job: ActiveJob, status: str, error: str | None, adapter: dict[str, Any] | None = None) -> None:
        self.jobs.finish(job.id, status, error, adapter)  # an unreachable store: the job stays, retried
        self._job = None
        shutil.rmtree(job.checkpoints, ignore_errors=True)
        log.info("training job %s %s%s", job.id, status, f": {error}" if error else "")

"""What training needs from its job queue, whichever backend keeps the jobs.

Two backends plug in at construction (server/app.py): `JobStore`, one SQLite
file in the local `--store` directory (one machine: its replicas share the file
and own jobs by flock), and `S3JobQueue`, job records and leases as objects in
the `--s3-store` bucket (several machines: ownership is a lease object with an
expiry, renewed by `heartbeat`). Both run a job under one owner at a time and
keep the same record shape (docs/API.md, "Training jobs").
"""

from __future__ import annotations

from typing import Any, Protocol

from server.training.jobs import NewJob


class JobQueue(Protocol):
    @property
    def owner(self) -> str | None:
        """The id this process claims jobs under."""
        ...

    @property
    def tick_s(self) -> float | None:
        """How often `heartbeat` must run (and the queue be looked at for others' jobs); None = never."""
        ...

    def create(self, job: NewJob) -> tuple[dict[str, Any], bool]:
        """(record, created): same tenant + idempotency key = the same job if the body matches, else 409."""
        ...

    def get(self, job_id: str, tenant: str | None, history: bool = True) -> dict[str, Any]: ...

    def list(self, tenant: str | None, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]: ...

    def spec_json(self, job_id: str) -> str: ...

    def status(self, job_id: str) -> tuple[str, bool]:
        """(status, cancel requested): the trainer asks once per step."""
        ...

    def count(self, status: str) -> int: ...

    def pending(self) -> bool:
        """Whether a job may wait for a trainer (cheap; a yes may be stale)."""
        ...

    def claim_next(self, owner: str | None = None) -> tuple[str, str, str, int] | None:
        """The oldest claimable job, now running under `owner`: (id, tenant, adapter_id, attempts)."""
        ...

    def holds(self, job_id: str, fresh: bool = False) -> bool:
        """Whether this process still owns `job_id`; `fresh` asks the store itself (before publishing)."""
        ...

    def abandon(self, job_id: str) -> None:
        """Stop owning `job_id` without writing its record (`holds` said no): its lease runs out."""
        ...

    def heartbeat(self) -> None:
        """Renew the leases of the jobs this process runs (every `tick_s`)."""
        ...

    def record_step(self, job_id: str, step: int, loss: float, lr: float) -> None: ...

    def rewind(self, job_id: str, step: int) -> None: ...

    def finish(self, job_id: str, status: str, error: str | None = None,
               adapter: dict[str, Any] | None = None) -> None: ...

    def requeue(self, job_id: str, refund_attempt: bool) -> None: ...

    def request_cancel(self, job_id: str, tenant: str | None) -> dict[str, Any]: ...

    def close(self) -> None: ...

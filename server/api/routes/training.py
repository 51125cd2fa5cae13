"""Routes: training jobs — submit (JSON or JSONL upload), list, get, cancel.

Handlers are sync (FastAPI runs them in its threadpool): submission tokenizes
the data to check it and every call touches the SQLite queue, neither of which
belongs on the event loop. Jobs are tenant-scoped like adapters: another
tenant's job is "not found".

Larger datasets: `POST /v1/training/jobs/upload`, multipart with `spec` (the
JSON body without `data`, as a form field) and `data` (a JSONL file, one
example per line), limited by `max_train_upload_bytes`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from server.adapters.ids import check_tenant
from server.api.deps import Principal, get_principal
from server.api.responses import JobList, JobRecord, ok
from server.errors import InvalidRequest, Unavailable
from server.api.services import get_services
from server.training.spec import Example, TrainingJobSpec, parse_jsonl

router = APIRouter(prefix="/v1/training", tags=["training"])

EXAMPLES = TypeAdapter(list[Example])
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def training_of(request: Request) -> Any:
    training = get_services(request).jobs
    if training is None:
        raise Unavailable("training is not available on this server")
    return training


def scope(principal: Principal, tenant: str | None = None) -> str | None:
    """The tenant filter: one's own; admins see every tenant (or the one they name)."""
    if principal.admin:
        return check_tenant(tenant) if tenant is not None else None
    if tenant is not None and tenant != principal.tenant:
        raise InvalidRequest("only admin keys may pass 'tenant'")
    return principal.tenant


def _submit(request: Request, spec: TrainingJobSpec, principal: Principal, key: str | None) -> JSONResponse:
    record, created = training_of(request).submit(spec, principal.tenant, key)
    return JSONResponse(record, status_code=202 if created else 200)


@router.post("/jobs", status_code=202, responses=ok(JobRecord, 200, 202))
def create_job(spec: TrainingJobSpec, request: Request, principal: Principal = Depends(get_principal),
               idempotency_key: str | None = Header(None, alias="Idempotency-Key")) -> JSONResponse:
    """Queue a job (202). A retry with the same Idempotency-Key and body returns the same job (200)."""
    return _submit(request, spec, principal, idempotency_key)


@router.post("/jobs/upload", status_code=202, responses=ok(JobRecord, 200, 202))
async def create_job_upload(request: Request, principal: Principal = Depends(get_principal),
                            idempotency_key: str | None = Header(None, alias="Idempotency-Key")) -> JSONResponse:
    """Multipart: `spec` = the JSON body without data, `data` = JSONL examples."""
    settings = get_services(request).settings
    try:
        form = await request.form(max_files=1, max_fields=2)
    except Exception as exc:  # noqa: BLE001 - malformed multipart is the client's
        raise InvalidRequest(f"expected multipart/form-data with 'spec' and 'data': {exc}") from None
    spec_part, data_part = form.get("spec"), form.get("data")
    if spec_part is None or data_part is None:
        raise InvalidRequest("multipart body needs a 'spec' field (JSON) and a 'data' file (JSONL)")
    spec_text = spec_part if isinstance(spec_part, str) else (await spec_part.read()).decode("utf-8", "replace")
    raw = data_part.encode() if isinstance(data_part, str) else await data_part.read()
    spec = await run_in_threadpool(_build_spec, spec_text, raw, settings.max_train_examples,
                                   settings.max_json_depth)
    return await run_in_threadpool(_submit, request, spec, principal, idempotency_key)


def _build_spec(spec_text: str, raw: bytes, limit: int, max_depth: int) -> TrainingJobSpec:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("data: the JSONL file is not UTF-8") from None
    try:
        examples = EXAMPLES.validate_python(parse_jsonl(text, limit, max_depth))
        spec = TrainingJobSpec.model_validate_json(spec_text)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    if spec.data:
        raise InvalidRequest("spec: give the examples in the 'data' file, not inline")
    try:
        return TrainingJobSpec.model_validate({**spec.model_dump(), "data": examples})
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


@router.get("/jobs", responses=ok(JobList, 200))
def list_jobs(request: Request, principal: Principal = Depends(get_principal),
              status: Status | None = None, tenant: str | None = None,
              limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
    """Newest first; without per-step loss history (GET one job for that)."""
    jobs = training_of(request).list(scope(principal, tenant), status, limit)
    return {"object": "list", "data": jobs}


@router.get("/jobs/{job_id}", responses=ok(JobRecord, 200))
def get_job(job_id: str, request: Request, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    return training_of(request).get(job_id, scope(principal))


@router.post("/jobs/{job_id}/cancel", responses=ok(JobRecord, 200, 202))
def cancel_job(job_id: str, request: Request, principal: Principal = Depends(get_principal)) -> JSONResponse:
    """Queued: cancelled at once (200). Running: stops before its next step (202, poll the job)."""
    record = training_of(request).cancel(job_id, scope(principal))
    return JSONResponse(record, status_code=200 if record["status"] == "cancelled" else 202)

"""Response shapes for the OpenAPI spec, so the published spec says what the server really answers.

Why a module of its own: the routes return JSONResponse / dicts (their status
depends on the outcome), so FastAPI cannot infer these; the schema fuzzer
(tests/hardening/test_schema_fuzz.py) checks every answer against them. Models
allow extra fields: the contract may grow (API.md: "extend it freely").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Open):
    type: str
    message: str
    param: str | None = None  # OpenAI routes only
    code: str | None = None  # OpenAI routes only


class ErrorResponse(Open):
    error: ErrorDetail


class Health(Open):
    status: str


class Ready(Open):
    ready: Literal[True]
    model: str


class NotReady(Open):
    ready: Literal[False]
    reason: str


class AdapterRecord(Open):
    id: str
    tenant: str
    type: str
    variant: str | None = None
    rank: int | None = None
    target_modules: list[str]
    size_bytes: int | None = None
    sha256: str | None = None
    version: int
    created_at: str | float | None = None
    mode: Literal["unmerged", "merged"]
    resident: bool


class AdapterList(Open):
    object: Literal["list"]
    data: list[AdapterRecord]


class JobProgress(Open):
    step: int
    steps: int


class JobRecord(Open):
    id: str
    tenant: str
    adapter_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    error: str | None = None


class JobList(Open):
    object: Literal["list"]
    data: list[JobRecord]


class ModelCard(Open):
    id: str
    object: Literal["model"]
    owned_by: str


class ModelList(Open):
    object: Literal["list"]
    data: list[ModelCard]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# Every operation: any client error, queue full, not accepting. FastAPI's default 422
# ({"detail": [...]}) is replaced: our 4xx bodies are {"error": {"type", "message"}}.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": _error("Client error: {'error': {'type', 'message'}} (OpenAI routes add 'param' and 'code')"),
    429: _error("Queue full; retry after the Retry-After header"),
    503: _error("Not accepting requests (starting, draining, or the engine stopped), or the shared adapter "
                "store is unreachable (type store_unavailable); see Retry-After"),
}

# With stream: true. One `data: <json>` line per event, then `data: [DONE]`; the events differ per route,
# so no schema is claimed for them (a validator would apply it to each parsed event).
SSE: dict[str, Any] = {"text/event-stream": {}}
PROMETHEUS = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}}


def ok(model: type[BaseModel], *statuses: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route answering `model` with these statuses (and SSE when `stream`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": model}
        if stream:
            entry["content"] = dict(SSE)
        out[status] = entry
    return out

"""Routes: adapters — upload (new version), list, get, delete.

Handlers stay thin: bytes are streamed into the store's staging dir
(server/api/upload.py), validated by the engine's own reader
(peft_format.read_adapter, off the event loop), published by the store, and
the adapter manager is told to forget cached versions. A tenant only ever
addresses its own namespace, so another tenant's adapter is simply "not found".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.adapters.ids import check_adapter_id, check_tenant
from server.adapters.store import AdapterStore, StoredVersion
from server.adapters.types import AdapterKey
from server.api.deps import Principal, get_principal
from server.api.errors import allowed_methods
from server.api.responses import AdapterList, AdapterRecord, ok
from server.api.upload import BodyReader, client_left, receive_upload
from server.errors import AdapterError, ApiError, InvalidRequest, Unavailable
from server.api.services import Services, get_services

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def target_tenant(principal: Principal, tenant: str | None) -> str:
    """Whose namespace a request addresses: its own, or (admins only) `?tenant=`."""
    if tenant is None or tenant == principal.tenant:
        return principal.tenant
    if not principal.admin:
        raise InvalidRequest("only admin keys may pass 'tenant'")
    return check_tenant(tenant)


def store_of(services: Services) -> AdapterStore:
    if services.store is None:
        raise Unavailable("the adapter store is not available")
    return services.store


def summarize(loaded: Any) -> dict[str, Any]:
    """The record fields the validator knows (type, variant, rank, target modules, tensor bytes).

    target_modules are reported as PEFT's short names (`q_proj`), as a user wrote them.
    """
    summary = dict(loaded.summary())
    summary["target_modules"] = sorted({str(m).rsplit(".", 1)[-1] for m in summary.get("target_modules", [])})
    return summary


def validate_adapter(services: Services, path: Path) -> Any:
    """Full validation with the engine's reader against the loaded base model (blocking);
    returns the LoadedAdapter, which the host tier can keep."""
    from server.adapters.peft_format import read_adapter

    try:
        loaded = read_adapter(path, services.base, services.adapters.limits)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - a reader bug must still be a clean 4xx for this upload
        log.exception("adapter validation failed unexpectedly")
        raise AdapterError(f"adapter could not be read: {type(e).__name__}: {e}") from None
    return loaded


def live_state(services: Services, key: AdapterKey) -> dict[str, Any]:
    """mode/resident come from the adapter manager (and its merge registry) when present."""
    manager = services.adapters
    mode, resident = "unmerged", False
    if manager is not None:
        is_merged = getattr(manager, "is_merged", None)
        is_resident = getattr(manager, "is_resident", None)
        if callable(is_merged) and is_merged(key.tenant, key.adapter_id, key.version):
            mode = "merged"
        if callable(is_resident):
            resident = bool(is_resident(key.tenant, key.adapter_id))
    return {"mode": mode, "resident": resident}


def present(services: Services, stored: StoredVersion) -> dict[str, Any]:
    record = dict(stored.record)
    record.update(id=stored.ref.key.adapter_id, tenant=stored.ref.key.tenant, version=stored.ref.key.version)
    record.setdefault("type", "unknown")
    record.setdefault("variant", None)
    record.setdefault("rank", None)
    record.setdefault("target_modules", [])
    return {**record, **live_state(services, stored.ref.key)}


def after_change(services: Services, tenant: str, adapter_id: str, *, deleted: bool) -> None:
    """Update caches and collect old files once no request pins them.

    A re-upload does not `forget()`: versions are part of the cache key, so the
    new version can never be served from a stale copy, and requests already
    admitted on the old version (queued or running) still find it; old copies
    age out of the LRU tiers. A delete forgets at once.
    """
    manager = services.adapters
    if deleted and services.merge is not None:  # a deleted adapter keeps no merged copy (issue 5)
        services.merge.forget(tenant, adapter_id)
    if manager is None:  # base model only: no request can hold an adapter version
        in_use: Any = lambda key: False  # noqa: E731
    else:
        if deleted:
            manager.forget(tenant, adapter_id)
        # Running requests pin their version in the manager; a queued one has no pin yet, and if its
        # version falls out of the host tier meanwhile, its admission re-reads these very files.
        in_use = lambda key: manager.is_pinned(key) or services.engine.is_queued(key)  # noqa: E731
    try:
        store_of(services).collect_garbage_soon(in_use, only=(tenant, adapter_id))
    except OSError:
        log.exception("adapter store garbage collection failed (retried on the next change)")


@router.put("/{adapter_id}", status_code=201, responses=ok(AdapterRecord, 201))
async def upload_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                         principal: Principal = Depends(get_principal)) -> JSONResponse:
    try:
        check_adapter_id(adapter_id)
        owner = target_tenant(principal, tenant)
        services = get_services(request)
        store = store_of(services)
    except ApiError:
        await BodyReader(request).discard()  # nothing read yet: let the client finish sending, then answer
        raise
    with store.staging() as staged:
        await receive_upload(request, staged, services.settings.max_adapter_bytes)
        async with client_left(request) as gone:  # a client that left gets nothing published
            loaded = await run_in_threadpool(validate_adapter, services, staged)
            stored = await run_in_threadpool(store.publish, owner, adapter_id, staged, summarize(loaded),
                                             gone.is_set)
    after_change(services, owner, adapter_id, deleted=False)
    if services.adapters is not None and services.settings.prefetch_adapters:
        services.adapters.adopt(stored.ref, loaded)  # validation loaded it: the first request skips the read
    if services.merge is not None:  # a dedicated adapter's new version is merged before we answer (issue 5)
        await services.merge.refresh(owner, adapter_id)
    return JSONResponse(present(services, stored), status_code=201)


@router.get("", responses=ok(AdapterList, 200))
async def list_adapters(request: Request, tenant: str | None = None,
                        principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    services = get_services(request)
    store = store_of(services)
    scope = None if principal.admin and tenant is None else target_tenant(principal, tenant)
    stored = await run_in_threadpool(store.list, scope)
    return {"object": "list", "data": [present(services, s) for s in stored]}


@router.get("/{adapter_id}", responses=ok(AdapterRecord, 200))
async def get_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                      principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    services = get_services(request)
    stored = await run_in_threadpool(store_of(services).get, owner, adapter_id)
    return present(services, stored)


@router.delete("/{adapter_id}", status_code=204)
async def delete_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                         principal: Principal = Depends(get_principal)) -> Response:
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    services = get_services(request)
    await run_in_threadpool(store_of(services).delete, owner, adapter_id)
    after_change(services, owner, adapter_id, deleted=True)
    return Response(status_code=204)


# Included by create_app *after* every other router: paths under /v1/adapters/
# that no route matched ("a/b", "//etc/passwd", "..%2f..", an empty id) are
# ids with a slash in them, so they get the id rule's 422 (API.md) instead of a
# bare 404 or a trailing-slash redirect. Routes included earlier (/merge) win.
fallback_router = APIRouter(prefix="/v1/adapters", include_in_schema=False)
ANY_METHOD = ["GET", "PUT", "POST", "DELETE", "PATCH"]


@fallback_router.api_route("/", methods=ANY_METHOD)
@fallback_router.api_route("/{rest:path}", methods=ANY_METHOD)
async def unmatched_adapter_path(request: Request, rest: str = "") -> Response:
    await BodyReader(request).discard()
    allowed = allowed_methods(request)
    if allowed:  # a real route serves this path, just not with this method
        raise ApiError(f"method {request.method} is not allowed here; allowed: {', '.join(allowed)}", status=405,
                       type="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    raise InvalidRequest(f"invalid adapter id {rest!r}: ids match ^[a-z0-9][a-z0-9._-]{{0,63}}$ "
                         "(no '/', no '..')")

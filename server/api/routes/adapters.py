"""Routes: adapters — upload (new version), list, get, delete.

Handlers parse, call the AdapterService (server/adapters/service.py: validate →
publish → collect → cache, the same steps the trainer's output goes through)
and present the record. Upload bytes are streamed into the store's staging dir
(server/api/upload.py). A tenant only ever addresses its own namespace, so
another tenant's adapter is simply "not found".
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.adapters.ids import ADAPTER_ID_RE, InvalidName, check_adapter_id, check_tenant
from server.adapters.store.store import StoredVersion
from server.api.deps import Principal, get_principal
from server.api.errors import allowed_methods
from server.api.responses import AdapterList, AdapterRecord, ok
from server.api.services import Services, get_services
from server.api.upload import BodyReader, client_left, multipart_boundary, receive_upload
from server.errors import ApiError, InvalidRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def target_tenant(principal: Principal, tenant: str | None) -> str:
    """Whose namespace a request addresses: its own, or (admins only) `?tenant=`."""
    if tenant is None or tenant == principal.tenant:
        return principal.tenant
    if not principal.admin:
        raise InvalidRequest("only admin keys may pass 'tenant'")
    return check_tenant(tenant)


def present(services: Services, stored: StoredVersion) -> dict[str, Any]:
    record = dict(stored.record)
    record.update(id=stored.ref.key.adapter_id, tenant=stored.ref.key.tenant, version=stored.ref.key.version)
    record.setdefault("type", "unknown")
    record.setdefault("variant", None)
    record.setdefault("rank", None)
    record.setdefault("target_modules", [])
    return {**record, **services.adapter_service.live_state(stored.ref.key)}


@router.put("/{adapter_id}", status_code=201, responses=ok(AdapterRecord, 201))
async def upload_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                         principal: Principal = Depends(get_principal)) -> JSONResponse:
    try:
        check_adapter_id(adapter_id)
        owner = target_tenant(principal, tenant)
        service = get_services(request).adapter_service
        boundary = multipart_boundary(request)  # before staging: a refusal on headers touches no disk
    except (ApiError, InvalidName):
        await BodyReader(request).discard()  # nothing read yet: let the client finish sending, then answer
        raise
    with service.staging() as staged:
        await receive_upload(request, boundary, staged, service.limits.max_adapter_bytes)
        async with client_left(request) as gone:  # a client that left gets nothing published
            stored = await run_in_threadpool(service.publish, owner, adapter_id, staged, None, gone.is_set)
    await service.settle(owner, adapter_id)
    return JSONResponse(present(get_services(request), stored), status_code=201)


@router.get("", responses=ok(AdapterList, 200))
async def list_adapters(request: Request, tenant: str | None = None,
                        principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    services = get_services(request)
    scope = None if principal.admin and tenant is None else target_tenant(principal, tenant)
    stored = await run_in_threadpool(services.store.list, scope)
    return {"object": "list", "data": [present(services, s) for s in stored]}


@router.get("/{adapter_id}", responses=ok(AdapterRecord, 200))
async def get_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                      principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    services = get_services(request)
    stored = await run_in_threadpool(services.adapter_service.get, owner, adapter_id)
    return present(services, stored)


@router.delete("/{adapter_id}", status_code=204)
async def delete_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                         principal: Principal = Depends(get_principal)) -> Response:
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    await run_in_threadpool(get_services(request).adapter_service.delete, owner, adapter_id)
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
    raise InvalidRequest(f"invalid adapter id {rest!r}: ids match {ADAPTER_ID_RE.pattern} (no '/', no '..')")

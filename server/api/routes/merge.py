"""Routes: the merge path — dedicate a merged copy of the base to an adapter, or take it back; store a
new adapter combined from others by a merge recipe (`POST /v1/adapters/{id}/mix`).

`POST /v1/adapters/{id}/merge` answers once the copy serves new requests:
201 with the adapter record (`mode: "merged"`) when a copy was built, 200 when
it already was merged. `DELETE /v1/adapters/{id}/merge` answers 200 with the
record (`mode: "unmerged"`) once new requests run unmerged; requests already in
the merged lane finish there. Both are idempotent and tenant-scoped like every
adapter route (another tenant's adapter is 404). The work lives in
server/adapters/merge/merge.py; these handlers only resolve who asks for what.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.adapters.ids import check_adapter_id
from server.adapters.merge.recipes import Recipe
from server.api.deps import Principal, get_principal
from server.api.responses import AdapterRecord, ok
from server.api.routes.adapters import present, target_tenant
from server.api.schemas import MixRecipeRequest
from server.api.services import get_services

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.post("/{adapter_id}/merge", responses=ok(AdapterRecord, 200, 201))
async def merge_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                        principal: Principal = Depends(get_principal)) -> JSONResponse:
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    services = get_services(request)
    created = await services.merge.dedicate(owner, adapter_id)
    stored = await run_in_threadpool(services.store.get, owner, adapter_id)
    return JSONResponse(present(services, stored), status_code=201 if created else 200)


@router.delete("/{adapter_id}/merge", responses=ok(AdapterRecord, 200))
async def unmerge_adapter(adapter_id: str, request: Request, tenant: str | None = None,
                          principal: Principal = Depends(get_principal)) -> JSONResponse:
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    services = get_services(request)
    await run_in_threadpool(services.store.get, owner, adapter_id)  # 404 before anything changes
    await services.merge.undedicate(owner, adapter_id)
    stored = await run_in_threadpool(services.store.get, owner, adapter_id)
    return JSONResponse(present(services, stored), status_code=200)


@router.post("/{adapter_id}/mix", status_code=201, responses=ok(AdapterRecord, 201))
async def mix_adapters(adapter_id: str, body: MixRecipeRequest, request: Request, tenant: str | None = None,
                       principal: Principal = Depends(get_principal)) -> JSONResponse:
    """A new version of `adapter_id` combined from the caller's adapters by a merge recipe (201, its record)."""
    check_adapter_id(adapter_id)
    owner = target_tenant(principal, tenant)
    services = get_services(request)
    recipe = Recipe(body.combination_type, tuple(m.weight for m in body.adapters), density=body.density,
                    majority_sign_method=body.majority_sign_method, seed=body.seed)
    members = [m.id for m in body.adapters]
    stored = await run_in_threadpool(services.adapter_service.publish_recipe, owner, adapter_id, members, recipe)
    await services.adapter_service.settle(owner, adapter_id)
    return JSONResponse(present(services, stored), status_code=201)

"""Route: `GET /v1/me` — who the caller's key is (tenant, admin).

Clients (the web console first) need it to show whose namespace they act in and whether
the tenant switcher applies; it says nothing about any other key or tenant.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from server.api.deps import Principal, get_principal

router = APIRouter(tags=["auth"])


@router.get("/v1/me")
async def me(principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    return {"tenant": principal.tenant, "admin": principal.admin}

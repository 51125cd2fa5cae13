"""FastAPI dependencies shared by the routes.

`get_principal` resolves the caller (tenant, admin). In dev mode (no
--api-keys) every caller is tenant `default`. The real Bearer-key check lives
in server/api/auth.py (owned by the adapter-store/auth work) and replaces the
body of `get_principal`; routes depend only on this signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False


async def get_principal(request: Request) -> Principal:
    return Principal(tenant=DEFAULT_TENANT, admin=False)

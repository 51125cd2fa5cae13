"""FastAPI dependencies shared by the routes.

`get_principal` resolves the caller (tenant, admin). In dev mode (no
--api-keys) every caller is tenant `default`. The Bearer-key check lives in
server/api/auth.py (AuthMiddleware guards every route and attaches the
principal); routes depend only on this signature.
"""

from __future__ import annotations

from fastapi import Request

from server.api.keys import DEFAULT_TENANT, Principal, authenticate
from server.errors import Unauthorized
from server.logging import PRINCIPAL_SCOPE_KEY

__all__ = ["DEFAULT_TENANT", "Principal", "get_principal"]


async def get_principal(request: Request) -> Principal:
    """The principal AuthMiddleware attached; checked here too if an app runs without it."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:
        return principal
    principal = authenticate(request.app.state.api_keys, request.scope.get("headers", []))
    if principal is None:
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    return principal

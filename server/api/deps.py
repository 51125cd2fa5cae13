"""FastAPI dependencies shared by the routes.

`get_principal` resolves the caller (tenant, admin). In dev mode (no
--api-keys) every caller is tenant `default`. The Bearer-key check lives in
server/api/auth.py (AuthMiddleware guards every route and attaches the
principal); routes depend only on this signature.
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
    """The principal AuthMiddleware attached; checked here too if an app runs without it."""
    from server.api.auth import PRINCIPAL_SCOPE_KEY, authenticate, load_api_keys
    from server.errors import Unauthorized

    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:
        return principal
    state = request.app.state
    if not hasattr(state, "api_keys"):
        settings = getattr(state, "settings", None)
        keys_file = getattr(settings, "api_keys", None)
        state.api_keys = load_api_keys(keys_file) if keys_file is not None else None
    principal = authenticate(state.api_keys, request.scope.get("headers", []))
    if principal is None:
        raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    return principal

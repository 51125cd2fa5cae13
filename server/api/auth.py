"""API keys → tenants, checked by a small ASGI middleware in front of every route.

Why a middleware and not only a route dependency: it covers *every* path the
app answers (including ones a future router forgets to protect, FastAPI's docs
and unknown paths), and it refuses an unauthenticated upload before a single
body byte is read. `/health` and `/ready` stay open for probes, and GET/HEAD of
the web console's static files (`/ui`, `/ui/static/<name>`): they hold no data,
and the page sends the key the user types with every data call.

The key table itself (loading, validation, constant-time lookup) lives in
server/api/keys.py; this module only guards the routes with it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response
from server.api.keys import ApiKeys, authenticate, bearer_token, load_keys
from server.api.limits import discard_unread
from server.logging import PRINCIPAL_SCOPE_KEY
from server.settings import Settings

OPEN_PATHS = frozenset({"/health", "/ready"})
# The console page and its assets, nothing else: one flat file name, no dots but the extension's.
CONSOLE_PATH = re.compile(r"/ui(?:/static/[a-z0-9_-]{1,64}\.(?:js|css|svg))?")
CONSOLE_METHODS = frozenset({"GET", "HEAD"})

log = logging.getLogger(__name__)
# A refused request's body is read (and dropped) up to this much so the client
# sees the 401 instead of a connection reset; an unauthenticated caller gets no more.
DISCARD_UNAUTHENTICATED = 1024 * 1024


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS or is_console(scope):
            await self.app(scope, receive, send)
            return
        principal = authenticate(self.keys, scope.get("headers", []))
        if principal is None:
            missing = bearer_token(scope.get("headers", [])) is None
            message = "missing API key: send 'Authorization: Bearer <key>'" if missing else "invalid API key"
            # Connection: close: what is left of the body is never read (nor 100 Continue sent for it)
            response = error_response(Request(scope), 401, "unauthorized", message,
                                      headers={"WWW-Authenticate": "Bearer", "Connection": "close"})
            await discard_unread(scope, receive, DISCARD_UNAUTHENTICATED)
            await response(scope, receive, send)
            return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        await self.app(scope, receive, send)


def is_console(scope: Scope) -> bool:
    return scope.get("method") in CONSOLE_METHODS and CONSOLE_PATH.fullmatch(scope.get("path", "")) is not None


def warn_if_exposed(path: Path) -> None:
    """Keys are secrets: say so when other users of the machine can read (or write) the file."""
    mode = Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("--api-keys file %s is accessible to group or others (mode %04o): chmod 600 it", path, mode)


def install_auth(app: FastAPI, settings: Settings, keys: ApiKeys | None = None) -> None:
    """Guard every route with `keys`: the table the CLI already loaded, else loaded here from
    settings.api_keys (raising ApiKeysError on a bad file)."""
    if keys is None:
        keys = load_keys(settings.api_keys)
    if settings.api_keys is not None:
        warn_if_exposed(settings.api_keys)
    app.state.api_keys = keys
    app.add_middleware(AuthMiddleware, keys=keys)

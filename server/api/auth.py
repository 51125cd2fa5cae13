"""API keys → tenants, checked by a small ASGI middleware in front of every route.

Why a middleware and not only a route dependency: it covers *every* path the
app answers (including ones a future router forgets to protect, FastAPI's docs
and unknown paths), and it refuses an unauthenticated upload before a single
body byte is read. `/health` and `/ready` stay open for probes.

Keys are loaded and validated once at start-up (`load_api_keys`); a bad file is
a start-up error, not a 500 later. A presented key is compared with every known
key with `hmac.compare_digest` over their SHA-256 digests, without an early
exit, so response timing does not reveal how much of a key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.adapters.store import TENANT_RE
from server.api.deps import DEFAULT_TENANT, Principal
from server import json_input
from server.api.errors import error_response
from server.api.limits import discard_unread
from server.settings import Settings

OPEN_PATHS = frozenset({"/health", "/ready"})
PRINCIPAL_SCOPE_KEY = "loraplex.principal"
MAX_KEYS_FILE_BYTES = 16 * 1024 * 1024
MAX_KEYS_FILE_DEPTH = 8  # a valid file nests 2 deep: {key: {tenant, admin}}
ENTRY_FIELDS = frozenset({"tenant", "admin"})
# What a client can send after "Bearer ": visible ASCII, no whitespace or control characters.
KEY_RE = re.compile(r"[\x21-\x7e]{8,}")

log = logging.getLogger(__name__)
# A refused request's body is read (and dropped) up to this much so the client
# sees the 401 instead of a connection reset; an unauthenticated caller gets no more.
DISCARD_UNAUTHENTICATED = 1024 * 1024


class ApiKeysError(ValueError):
    """The --api-keys file is unusable; the message says why (shown at start-up)."""


class ApiKeys:
    """The key table: SHA-256(key) → Principal."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self._table = [(_digest(key), p) for key, p in principals.items()]

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, key: str) -> Principal | None:
        presented = _digest(key)
        found: Principal | None = None
        for digest, principal in self._table:  # no early exit: constant time in the key table
            if hmac.compare_digest(presented, digest):
                found = principal
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_api_keys(path: Path) -> ApiKeys:
    """Parse and validate `{"<key>": {"tenant": "acme", "admin": false}, ...}`."""
    try:
        if Path(path).stat().st_size > MAX_KEYS_FILE_BYTES:
            raise ApiKeysError(f"--api-keys file {path} is larger than {MAX_KEYS_FILE_BYTES} bytes")
        data = json_input.loads(Path(path).read_text(encoding="utf-8"), MAX_KEYS_FILE_DEPTH,
                                object_pairs_hook=_refuse_duplicates)
    except OSError as e:
        raise ApiKeysError(f"cannot read --api-keys file {path}: {e.strerror or e}") from None
    except _Duplicate as e:
        what = f"field {e.name!r}" if e.name in ENTRY_FIELDS else f"key #{_fingerprint(e.name)}"
        raise ApiKeysError(f"--api-keys file {path}: {what} is listed twice; each may appear once") from None
    except ValueError as e:
        raise ApiKeysError(f"--api-keys file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ApiKeysError(f"--api-keys file {path} must be a non-empty JSON object {{key: {{tenant, admin}}}}")
    return ApiKeys({key: _parse_entry(path, key, entry) for key, entry in data.items()})


class _Duplicate(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json keeps the last of two equal names: one key silently taking another tenant's entry."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _Duplicate(name)
        out[name] = value
    return out


def _parse_entry(path: Path, key: str, entry: object) -> Principal:
    where = f"--api-keys file {path}, key #{_fingerprint(key)}"
    if not KEY_RE.fullmatch(key):
        raise ApiKeysError(f"{where}: keys must be at least 8 visible ASCII characters (no spaces or control "
                           "characters), as an HTTP header carries them")
    if not isinstance(entry, dict):
        raise ApiKeysError(f"{where}: value must be an object {{\"tenant\": str, \"admin\": bool}}")
    unknown = set(entry) - ENTRY_FIELDS
    if unknown:
        raise ApiKeysError(f"{where}: unknown fields {sorted(unknown)}")
    tenant, admin = entry.get("tenant"), entry.get("admin", False)
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant) or ".." in tenant:
        raise ApiKeysError(f"{where}: tenant {tenant!r} must match {TENANT_RE.pattern}")
    if not isinstance(admin, bool):
        raise ApiKeysError(f"{where}: admin must be true or false")
    return Principal(tenant=tenant, admin=admin)


def _fingerprint(key: str) -> str:
    """A short, non-reversible tag so error messages never print a secret."""
    return _digest(key).hex()[:8]


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def authenticate(keys: ApiKeys | None, headers: list[tuple[bytes, bytes]]) -> Principal | None:
    """The caller's principal; None when keys are configured and the request has no valid one."""
    if keys is None:
        return Principal(tenant=DEFAULT_TENANT, admin=False)
    token = bearer_token(headers)
    return keys.lookup(token) if token is not None else None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: ApiKeys | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
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


def warn_if_exposed(path: Path) -> None:
    """Keys are secrets: say so when other users of the machine can read (or write) the file."""
    mode = Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("--api-keys file %s is accessible to group or others (mode %04o): chmod 600 it", path, mode)


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Load the key table (raising ApiKeysError on a bad file) and guard every route."""
    keys = load_api_keys(settings.api_keys) if settings.api_keys is not None else None
    if settings.api_keys is not None:
        warn_if_exposed(settings.api_keys)
    app.state.api_keys = keys
    app.add_middleware(AuthMiddleware, keys=keys)

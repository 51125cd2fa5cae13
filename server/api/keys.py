"""The API keys file → principals: read and validated once, at start-up.

A bad file is a start-up error naming the problem (never the secret), not a
500 later. A presented key is compared with every known key with
`hmac.compare_digest` over their SHA-256 digests, without an early exit, so
response timing does not reveal how much of a key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server import json_input
from server.adapters.ids import TENANT_RE, is_valid_name
from server.api.quotas import QUOTA_FIELDS, TenantQuotas, parse_quotas

DEFAULT_TENANT = "default"
MAX_KEYS_FILE_BYTES = 16 * 1024 * 1024
MAX_KEYS_FILE_DEPTH = 8  # a valid file nests 3 deep: {"tenants": {tenant: {limits}}}
ENTRY_FIELDS = frozenset({"tenant", "admin"})
# The sectioned layout's top-level names: shorter than any key (KEY_RE), so never mistaken for one.
SECTIONS = frozenset({"keys", "tenants"})
FIELD_NAMES = ENTRY_FIELDS | QUOTA_FIELDS | SECTIONS
# What a client can send after "Bearer ": visible ASCII, no whitespace or control characters.
KEY_RE = re.compile(r"[\x21-\x7e]{8,}")


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False


class ApiKeysError(ValueError):
    """The --api-keys file is unusable; the message says why (shown at start-up)."""


class ApiKeys:
    """The key table: SHA-256(key) → Principal; and the tenants' limits and shares."""

    def __init__(self, principals: dict[str, Principal], quotas: TenantQuotas | None = None) -> None:
        self._table = [(_digest(key), p) for key, p in principals.items()]
        self.quotas = quotas if quotas is not None else TenantQuotas()

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


def load_keys(path: Path | None) -> ApiKeys | None:
    """The key table of settings.api_keys; None (single-tenant dev mode) when no file is configured."""
    return load_api_keys(path) if path is not None else None


def load_api_keys(path: Path) -> ApiKeys:
    """Parse and validate `{"<key>": {"tenant": "acme", "admin": false}, ...}`, or the sectioned
    layout `{"keys": {<that map>}, "tenants": {"acme": {limits}}}`."""
    try:
        if Path(path).stat().st_size > MAX_KEYS_FILE_BYTES:
            raise ApiKeysError(f"--api-keys file {path} is larger than {MAX_KEYS_FILE_BYTES} bytes")
        data = json_input.loads(Path(path).read_text(encoding="utf-8"), MAX_KEYS_FILE_DEPTH,
                                object_pairs_hook=_refuse_duplicates)
    except OSError as e:
        raise ApiKeysError(f"cannot read --api-keys file {path}: {e.strerror or e}") from None
    except _Duplicate as e:
        what = f"field {e.name!r}" if e.name in FIELD_NAMES else f"key #{_fingerprint(e.name)}"
        raise ApiKeysError(f"--api-keys file {path}: {what} is listed twice; each may appear once") from None
    except ValueError as e:
        raise ApiKeysError(f"--api-keys file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ApiKeysError(f"--api-keys file {path} must be a non-empty JSON object {{key: {{tenant, admin}}}}")
    if not SECTIONS.isdisjoint(data):
        return _load_sections(path, data)
    return ApiKeys({key: _parse_entry(path, key, entry) for key, entry in data.items()})


def _load_sections(path: Path, data: dict[str, Any]) -> ApiKeys:
    others = len(set(data) - SECTIONS)
    if others:  # never name them: they may be keys
        raise ApiKeysError(f"--api-keys file {path}: with a 'tenants' section the top level holds only 'keys' "
                           f"and 'tenants'; {others} other name(s) found (keys go inside 'keys')")
    keys = data.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise ApiKeysError(f"--api-keys file {path}: 'keys' must be a non-empty object {{key: {{tenant, admin}}}}")
    principals = {key: _parse_entry(path, key, entry) for key, entry in keys.items()}
    try:
        quotas = parse_quotas(data.get("tenants", {}), {p.tenant for p in principals.values()})
    except ValueError as e:
        raise ApiKeysError(f"--api-keys file {path}: {e}") from None
    return ApiKeys(principals, quotas)


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
    if not is_valid_name(tenant):
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
    """The caller's principal ; None when keys are configured and the request has no valid one."""
    if keys is None:
        return Principal(tenant=DEFAULT_TENANT, admin=False)
    token = bearer_token(headers)
    return keys.lookup(token) if token is not None else None

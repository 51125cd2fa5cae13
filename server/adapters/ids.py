"""The one naming rule for adapter ids and tenants.

Both become directory names in the store, so both obey one pattern (and never
contain '..'); every check and every error message quotes it from here. A leaf:
a broken name is an `InvalidName` (a ValueError), which callers map to their own
error (the store and the API layer answer it as a 422).
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ADAPTER_ID_RE = re.compile(NAME_PATTERN)
TENANT_RE = ADAPTER_ID_RE  # tenant names become directory names too


class InvalidName(ValueError):
    """An adapter id or tenant that breaks the naming rule; the message quotes the rule."""


def is_valid_name(name: object) -> bool:
    """True when `name` may become a store directory name."""
    return isinstance(name, str) and bool(ADAPTER_ID_RE.fullmatch(name)) and ".." not in name


def check_adapter_id(adapter_id: str) -> str:
    """API.md's id rule; ids never become paths unless they pass it."""
    if not is_valid_name(adapter_id):
        raise InvalidName(
            f"invalid adapter id {adapter_id!r}: must match {ADAPTER_ID_RE.pattern} and not contain '..'"
        )
    return adapter_id


def check_tenant(tenant: str) -> str:
    """Tenant names become directory names, so they obey the adapter-id rule."""
    if not is_valid_name(tenant):
        raise InvalidName(f"invalid tenant {tenant!r}: must match {TENANT_RE.pattern} and not contain '..'")
    return tenant

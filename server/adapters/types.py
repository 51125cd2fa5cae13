"""Adapter identity shared by the store, the cache and the engine.

A key names one immutable *version* of a tenant's adapter: a re-upload makes a
new key, so a cached copy can never be served stale and a running request
keeps the version it started with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.errors import InvalidRequest

ADAPTER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_adapter_id(adapter_id: str) -> str:
    """API.md's id rule; ids never become paths unless they pass it."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_RE.fullmatch(adapter_id) or ".." in adapter_id:
        raise InvalidRequest(
            f"invalid adapter id {adapter_id!r}: must match {ADAPTER_ID_RE.pattern} and not contain '..'"
        )
    return adapter_id


@dataclass(frozen=True, order=True)
class AdapterKey:
    tenant: str
    adapter_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.adapter_id}@v{self.version}"


@dataclass(frozen=True)
class AdapterRef:
    """Where one version lives on disk: `path` holds adapter_config.json + adapter_model.safetensors."""

    key: AdapterKey
    path: Path

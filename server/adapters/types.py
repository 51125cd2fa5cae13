"""Adapter identity shared by the store, the cache and the engine.

A key names one immutable *version* of a tenant's adapter: a re-upload makes a
new key, so a cached copy can never be served stale and a running request
keeps the version it started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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

"""The identity of a per-request adapter mix: its members' exact versions and weights.

A mix is cached and slotted like any adapter, under an AdapterKey of its own derived
from its recipe: a re-upload of a member resolves to a new version, hence a new
recipe and key, so a stale mix is never served; a request already running keeps
the one it started with. Its `adapter_id` contains ':', which no stored id may
(ids.py), so it can never name, or collide with, a real adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from server.adapters.types import AdapterKey

MIX_PREFIX = "mix:"


@dataclass(frozen=True)
class MixRecipe:
    tenant: str
    members: tuple[tuple[AdapterKey, float], ...]  # (member version, weight), in the request's order

    @property
    def key(self) -> AdapterKey:
        canon = json.dumps([[k.adapter_id, k.version, float(w).hex()] for k, w in self.members])
        return AdapterKey(self.tenant, MIX_PREFIX + hashlib.sha256(canon.encode()).hexdigest()[:24], 0)

    def uses(self, tenant: str, adapter_id: str) -> bool:
        return any((k.tenant, k.adapter_id) == (tenant, adapter_id) for k, _ in self.members)


def is_mix(key: AdapterKey) -> bool:
    return key.adapter_id.startswith(MIX_PREFIX)

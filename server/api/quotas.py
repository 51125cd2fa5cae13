"""Per-tenant limits and shares: the API-keys file's `tenants` section, validated at start-up.

Limits belong to the tenant, not to a key: every key of a tenant draws on the same
buckets and counts, so handing a tenant more keys never raises its limits. The
entry `"*"` (not a valid tenant name) gives the limits of every tenant without an
entry of its own; each such tenant still gets its own buckets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass

from server.adapters.ids import TENANT_RE, is_valid_name

ANY_TENANT = "*"
INT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "max_queued")
QUOTA_FIELDS = frozenset({*INT_FIELDS, "weight"})
MAX_LIMIT = 10**12
MAX_WEIGHT = 1000.0


@dataclass(frozen=True)
class TenantQuota:
    requests_per_minute: int | None = None  # token bucket: bursts up to this, refilled at this per minute
    tokens_per_minute: int | None = None  # prompt + max new tokens × n reserved at submit, unused part refunded
    max_concurrent: int | None = None  # the tenant's sequences in the running batch; more wait in the queue
    max_queued: int | None = None  # the tenant's requests waiting for the batch; one more is a 429
    weight: float = 1.0  # share of service under contention, relative to other tenants


UNLIMITED = TenantQuota()


class TenantQuotas:
    """Tenant → its quota; what the limiter and the engine's fair admission read."""

    def __init__(self, quotas: Mapping[str, TenantQuota] | None = None, default: TenantQuota = UNLIMITED) -> None:
        self._quotas = dict(quotas or {})
        self._default = default

    def of(self, tenant: str) -> TenantQuota:
        return self._quotas.get(tenant, self._default)

    def weight(self, tenant: str) -> float:
        return self.of(tenant).weight

    def max_running(self, tenant: str) -> int | None:
        return self.of(tenant).max_concurrent


def parse_quotas(section: object, tenants: Set[str]) -> TenantQuotas:
    """`{"<tenant>" | "*": {field: value}}` → TenantQuotas; ValueError saying what is wrong.

    A tenant no key belongs to is refused: it is a misspelling, and its limits would never apply.
    """
    if not isinstance(section, dict):
        raise ValueError("'tenants' must be an object {tenant: {limits}}")
    quotas: dict[str, TenantQuota] = {}
    default = UNLIMITED
    for tenant, entry in section.items():
        if tenant != ANY_TENANT:
            if not is_valid_name(tenant):
                raise ValueError(f"tenants: {tenant!r} must be '*' or match {TENANT_RE.pattern}")
            if tenant not in tenants:
                raise ValueError(f"tenants: no key belongs to tenant {tenant!r}")
        quota = _parse_quota(f"tenants.{tenant}", entry)
        if tenant == ANY_TENANT:
            default = quota
        else:
            quotas[tenant] = quota
    return TenantQuotas(quotas, default)


def _parse_quota(where: str, entry: object) -> TenantQuota:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with some of {sorted(QUOTA_FIELDS)}")
    unknown = set(entry) - QUOTA_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)} (known: {sorted(QUOTA_FIELDS)})")
    for name in INT_FIELDS:
        value = entry.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= MAX_LIMIT):
            raise ValueError(f"{where}.{name} must be an integer between 1 and {MAX_LIMIT}, got {value!r}")
    weight = entry.get("weight", 1.0)
    if (not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight)
            or not 0 < weight <= MAX_WEIGHT):
        raise ValueError(f"{where}.weight must be a number in (0, {MAX_WEIGHT:g}], got {weight!r}")
    return TenantQuota(**{name: entry.get(name) for name in INT_FIELDS}, weight=float(weight))

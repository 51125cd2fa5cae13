"""The API-keys file's `tenants` section: per-tenant limits and weights, refused clearly when wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.api.keys import ApiKeysError, load_api_keys
from server.api.quotas import TenantQuota

KEYS = {"alice-key-0001": {"tenant": "alice"}, "alice-key-0002": {"tenant": "alice"},
        "bob-key-000001": {"tenant": "bob"}}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_limits_are_per_tenant_and_star_covers_the_rest(tmp_path: Path) -> None:
    keys = load_api_keys(write(tmp_path / "k.json", {"keys": KEYS, "tenants": {
        "alice": {"requests_per_minute": 60, "tokens_per_minute": 10_000, "max_concurrent": 4, "max_queued": 8,
                  "weight": 2},
        "*": {"requests_per_minute": 5}}}))
    assert keys.lookup("alice-key-0002").tenant == "alice"
    assert keys.quotas.of("alice") == TenantQuota(60, 10_000, 4, 8, 2.0)
    assert keys.quotas.weight("alice") == 2.0 and keys.quotas.max_running("alice") == 4
    assert keys.quotas.of("bob") == TenantQuota(requests_per_minute=5)


def test_flat_layout_still_loads_with_no_limits(tmp_path: Path) -> None:
    keys = load_api_keys(write(tmp_path / "k.json", KEYS))
    assert len(keys) == 3 and keys.quotas.of("alice") == TenantQuota()


@pytest.mark.parametrize("content, reason", [
    ({"keys": KEYS, "tenants": {"alice": {"requests_per_minit": 5}}},
     r"tenants.alice: unknown fields \['requests_per_minit'\]"),
    ({"keys": KEYS, "tenants": {"alice": {"requests_per_minute": 0}}}, "requests_per_minute must be an integer"),
    ({"keys": KEYS, "tenants": {"alice": {"max_queued": 2.5}}}, "max_queued must be an integer"),
    ({"keys": KEYS, "tenants": {"alice": {"max_concurrent": True}}}, "max_concurrent must be an integer"),
    ({"keys": KEYS, "tenants": {"alice": {"weight": 0}}}, r"weight must be a number in \(0, 1000\]"),
    ({"keys": KEYS, "tenants": {"alice": {"weight": "high"}}}, "weight must be a number"),
    ({"keys": KEYS, "tenants": {"alice": 5}}, "tenants.alice must be an object"),
    ({"keys": KEYS, "tenants": {"carol": {"weight": 2}}}, "no key belongs to tenant 'carol'"),
    ({"keys": KEYS, "tenants": {"Bad Name": {}}}, "must be '\\*' or match"),
    ({"keys": KEYS, "tenants": []}, "'tenants' must be an object"),
    ({"tenants": {}}, "'keys' must be a non-empty object"),
    ({"keys": {}, "tenants": {}}, "'keys' must be a non-empty object"),
    ({"keys": KEYS, "stray-secret-key": {"tenant": "x"}}, "1 other name"),
    ('{"keys": {"alice-key-0001": {"tenant": "alice"}}, "tenants": {"alice": {"weight": 1, "weight": 9}}}',
     "field 'weight' is listed twice"),
])
def test_bad_tenants_section_is_a_clear_startup_error(tmp_path: Path, content: object, reason: str) -> None:
    with pytest.raises(ApiKeysError, match=reason) as info:
        load_api_keys(write(tmp_path / "k.json", content))
    assert "alice-key" not in str(info.value) and "stray-secret" not in str(info.value)

"""The multiplexed id a request routes by: tenant-scoped, read from where the API puts the adapter."""

from __future__ import annotations

import json

import pytest

from server.api.keys import ApiKeys, Principal
from server.cluster.affinity import affinity_id, split_id
from server.cluster.bridge import RequestHead

KEYS = ApiKeys({"k-alice": Principal("alice", False), "k-bob": Principal("bob", False),
                "k-root": Principal("ops", True)})


def head(method: str, path: str, key: str | None = "k-alice", query: bytes = b"") -> RequestHead:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return RequestHead(method, path, query, headers, None, None)


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("POST", "/generate", {"prompt": "x", "adapter_id": "tuned"}, "alice/tuned"),
    ("POST", "/generate", {"prompt": "x"}, ""),
    ("POST", "/v1/completions", {"model": "tuned", "prompt": "x"}, "alice/tuned"),
    ("POST", "/v1/chat/completions", {"model": "base-model", "messages": []}, ""),  # the base: any replica
    ("PUT", "/v1/adapters/tuned", None, "alice/tuned"),
    ("POST", "/v1/adapters/tuned/merge", None, "alice/tuned"),
    ("GET", "/v1/adapters", None, ""),
    ("POST", "/v1/training/jobs", {"adapter_id": "tuned"}, ""),  # training runs where the queue puts it
    ("POST", "/generate", {"adapter_id": "../etc"}, ""),
    ("POST", "/generate", {"adapter_id": 3}, ""),
])
def test_the_adapter_is_read_from_body_or_path(method, path, body, expected):
    raw = json.dumps(body).encode() if body is not None else b""
    assert affinity_id(head(method, path), raw, KEYS, "base-model") == expected


def test_two_tenants_same_adapter_name_are_two_ids():
    body = json.dumps({"adapter_id": "same"}).encode()
    ids = {affinity_id(head("POST", "/generate", key), body, KEYS, "b") for key in ("k-alice", "k-bob")}
    assert ids == {"alice/same", "bob/same"}


def test_unreadable_or_unauthenticated_requests_route_anywhere():
    assert affinity_id(head("POST", "/generate"), b"{not json", KEYS, "b") == ""
    assert affinity_id(head("POST", "/generate", key="wrong"), b'{"adapter_id": "a"}', KEYS, "b") == ""
    assert affinity_id(head("POST", "/generate", key=None), b'{"adapter_id": "a"}', None, "b") == "default/a"


def test_an_admin_names_the_owner_with_tenant():
    got = affinity_id(head("PUT", "/v1/adapters/a", "k-root", b"tenant=alice"), b"", KEYS, "b")
    assert got == "alice/a" and split_id(got) == ("alice", "a") and split_id("nonsense") is None

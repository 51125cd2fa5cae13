"""API keys and tenants over real HTTP (uvicorn on 127.0.0.1 with the tiny model)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.keys import ApiKeysError, load_api_keys, load_keys
from server.app import create_app
from server.settings import Settings
from tests.harness import REPO_ROOT, cpu_settings, running_server, serve_command

KEYS = {
    "alice-key-0001": {"tenant": "alice", "admin": False},
    "bob-key-000001": {"tenant": "bob"},
    "root-key-00001": {"tenant": "ops", "admin": True},
}
# Open paths → a concrete request to each (the console's assets are named files, not any id).
OPEN = {"/health": "/health", "/ready": "/ready", "/ui": "/ui", "/ui/static/{name}": "/ui/static/app.js"}


def write_keys(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed_settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    tmp = tmp_path_factory.mktemp("auth")
    return cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json", KEYS))


@pytest.fixture(scope="module")
def keyed_app(keyed_settings: Settings):
    return create_app(keyed_settings)


@pytest.fixture(scope="module")
def url(keyed_app) -> Iterator[str]:
    with running_server(keyed_app) as base_url:
        yield base_url


def all_routes(routes: list) -> Iterator[tuple[str, set[str]]]:
    """Every (path, methods) the app answers, through FastAPI's included-router wrappers."""
    for route in routes:
        if hasattr(route, "original_router"):
            yield from all_routes(route.original_router.routes)
        elif hasattr(route, "path"):
            yield route.path, set(getattr(route, "methods", None) or {"GET"})


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "some-id", path)


def test_every_route_except_probes_needs_a_key(keyed_app, url: str) -> None:
    routes = list(all_routes(keyed_app.routes))
    paths = {p for p, _ in routes}
    # The enumeration really sees the routers (guards against a vacuous pass).
    assert {"/generate", "/v1/adapters", "/v1/adapters/{adapter_id}", "/v1/models", "/metrics"} <= paths
    checked = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for path, methods in routes:
            for method in methods - {"HEAD", "OPTIONS"}:
                target = concrete(path)
                if path in OPEN:
                    assert client.request(method, OPEN[path]).status_code != 401, path
                    continue
                for headers in ({}, auth("wrong-key-123"), {"Authorization": "Basic YWxpY2U6eA=="}):
                    r = client.request(method, target, headers=headers, content=b"{}")
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert "message" in r.json()["error"], r.text
                    assert r.headers.get("www-authenticate") == "Bearer"
                    checked += 1
    assert checked >= 3 * 8


def test_unknown_path_without_key_is_401_json(url: str) -> None:
    r = httpx.get(f"{url}/no/such/thing")
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"


def test_probes_are_open(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").status_code == 200


def test_valid_keys_map_to_their_tenant(url: str) -> None:
    for key in ("alice-key-0001", "bob-key-000001", "root-key-00001"):
        r = httpx.get(f"{url}/v1/adapters", headers=auth(key))
        assert r.status_code == 200, r.text
        assert r.json()["data"] == []
    # Non-admins may not address another tenant's namespace.
    r = httpx.get(f"{url}/v1/adapters", params={"tenant": "bob"}, headers=auth("alice-key-0001"))
    assert r.status_code == 422 and "admin" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/adapters", params={"tenant": "bob"}, headers=auth("root-key-00001"))
    assert r.status_code == 200


def test_me_names_the_keys_tenant_and_role(url: str) -> None:
    assert httpx.get(f"{url}/v1/me", headers=auth("alice-key-0001")).json() == {"tenant": "alice", "admin": False}
    assert httpx.get(f"{url}/v1/me", headers=auth("root-key-00001")).json() == {"tenant": "ops", "admin": True}
    assert httpx.get(f"{url}/v1/me").status_code == 401


def test_unauthenticated_upload_is_refused_before_reading(url: str, keyed_settings: Settings) -> None:
    files = {"config": ("adapter_config.json", b"{}"), "weights": ("adapter_model.safetensors", b"x" * 1000)}
    r = httpx.put(f"{url}/v1/adapters/sneaky", files=files)
    assert r.status_code == 401
    store = Path(keyed_settings.store)
    opened = {".training", ".locks"}  # made when the server opened the store: job queue, lock stripes
    written = [p for p in store.rglob("*") if p.is_file() and not opened & set(p.relative_to(store).parts)]
    assert [p.name for p in written] == [".lock"]  # the server's own store lock, nothing of the upload


def test_dev_mode_is_tenant_default(tiny_settings: Settings) -> None:
    with running_server(tiny_settings) as base_url:
        r = httpx.get(f"{base_url}/v1/adapters")
        assert r.status_code == 200 and r.json()["data"] == []
        r = httpx.get(f"{base_url}/v1/adapters/nothing")
        assert r.status_code == 404 and r.json()["error"]["message"] == "adapter 'nothing' not found"


@pytest.mark.parametrize("content, reason", [
    ("not json", "not valid JSON"),
    ([], "non-empty JSON object"),
    ({}, "non-empty JSON object"),
    ({"short": {"tenant": "a"}}, "at least 8"),
    ({"long-enough-key": "acme"}, "must be an object"),
    ({"long-enough-key": {"tenant": "../etc"}}, "tenant"),
    ({"long-enough-key": {"tenant": "Acme"}}, "tenant"),
    ({"long-enough-key": {"tenant": "acme", "admin": "yes"}}, "admin"),
    ({"long-enough-key": {"tenant": "acme", "role": "x"}}, "unknown fields"),
    # json would keep the last entry: the key silently becomes the ops admin
    ('{"long-enough-key": {"tenant": "acme"}, "long-enough-key": {"tenant": "ops", "admin": true}}',
     "key #[0-9a-f]{8} is listed twice"),
    ('{"long-enough-key": {"tenant": "acme", "tenant": "ops"}}', "field 'tenant' is listed twice"),
    ({"cl\u00e9-long-enough": {"tenant": "acme"}}, "visible ASCII"),  # not sendable in an HTTP header
    ({"long-enough-key\u0085": {"tenant": "acme"}}, "visible ASCII"),
    ({"long-enough\x7fkey": {"tenant": "acme"}}, "visible ASCII"),
    ({"long-enough\tkey": {"tenant": "acme"}}, "visible ASCII"),
    ({"long-enough\u00a0key": {"tenant": "acme"}}, "visible ASCII"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 8 levels"),  # RecursionError in json
    ({"long-enough-key": {"tenant": [[[[[[[["acme"]]]]]]]]}}, "nested deeper than 8 levels"),
])
def test_bad_keys_file_is_a_clear_startup_error(tmp_path: Path, content: object, reason: str) -> None:
    path = write_keys(tmp_path / "keys.json", content)
    with pytest.raises(ApiKeysError, match=reason):
        load_api_keys(path)
    with pytest.raises(ApiKeysError, match=reason) as info:  # start-up loads settings.api_keys once
        load_keys(Settings(api_keys=path, store=tmp_path / "s").api_keys)
    assert "long-enough-key" not in str(info.value)  # a secret is never echoed


def test_bad_keys_file_stops_serve_with_one_line(tmp_path: Path) -> None:
    """`loraplex serve --api-keys FILE`: exit 2 and one line naming the problem, never a traceback."""
    path = write_keys(tmp_path / "keys.json", "[" * 100_000 + "]" * 100_000)
    done = subprocess.run(serve_command(["--api-keys", str(path), "--store", str(tmp_path / "s")]),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "api_keys" in lines[0] and "nested deeper than 8 levels" in lines[0], lines


@pytest.mark.parametrize("mode, warned", [(0o600, False), (0o400, False), (0o640, True), (0o644, True),
                                          (0o602, True)])
def test_keys_file_readable_by_others_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int,
                                                warned: bool) -> None:
    from fastapi import FastAPI

    from server.api.auth import install_auth

    path = write_keys(tmp_path / "keys.json", KEYS)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="server.api.auth"):
        install_auth(FastAPI(), Settings(api_keys=path, store=tmp_path / "s"))
    messages = [r.getMessage() for r in caplog.records if r.name == "server.api.auth"]
    assert bool(messages) == warned, messages
    if warned:
        assert f"mode {mode:04o}" in messages[0] and "chmod 600" in messages[0]


def test_missing_keys_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    with pytest.raises(ApiKeysError, match="cannot read --api-keys file"):
        load_keys(Settings(api_keys=tmp_path / "absent.json", store=tmp_path / "s").api_keys)


def test_lookup(tmp_path: Path) -> None:
    keys = load_api_keys(write_keys(tmp_path / "keys.json", KEYS))
    assert len(keys) == 3
    assert keys.lookup("root-key-00001").admin and keys.lookup("root-key-00001").tenant == "ops"
    assert keys.lookup("alice-key-0001").tenant == "alice"
    assert keys.lookup("alice-key-000") is None and keys.lookup("") is None

"""Adapter upload parsing: every multipart refusal is a 4xx JSON error that leaves the store as it was."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api.adapter_http import store_files
from tests.harness import running_server


@pytest.fixture
def server(tiny_settings):
    with running_server(tiny_settings) as url:
        yield url, tiny_settings.store


def _part(boundary: bytes, name: str, headers: bytes = b"") -> bytes:
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"; "
            b"filename=\"f\"\r\n" + headers + b"\r\n{}\r\n")


@pytest.mark.parametrize("case", ["boundary_over_parser_limit", "part_header_over_parser_limit"])
def test_multipart_parser_refusals_are_json_4xx(server, case):
    url, store = server
    before = store_files(store)
    boundary = b"b" * (5000 if case == "boundary_over_parser_limit" else 32)
    extra = b"X-Pad: " + b"p" * 20000 + b"\r\n" if case == "part_header_over_parser_limit" else b""
    body = _part(boundary, "config", extra) + b"--" + boundary + b"--\r\n"
    r = httpx.put(f"{url}/v1/adapters/parsed", content=body, timeout=30,
                  headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()})
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]["message"]
    assert ("boundary" if case == "boundary_over_parser_limit" else "multipart") in message
    assert store_files(store) == before
    assert httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 1}, timeout=30).status_code == 200


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=" + "b" * 5000, "application/json"])
def test_an_upload_refused_on_its_headers_stages_nothing(server, content_type):
    """A Content-Type no multipart parser would take is refused before any staging dir is made: a hostile
    client replaying it costs the server no filesystem work on the event loop."""
    from tests.api.raw_http import connect, read_response
    from tests.harness import wait_until

    url, store = server
    with connect(url) as sock:
        sock.sendall(f"PUT /v1/adapters/early HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
                     "Content-Length: 4\r\n\r\n".encode())  # the body is held back: the handler waits on it
        staged = wait_until(lambda: any((store / ".tmp").glob("*")), timeout=1.0)
        sock.sendall(b"{}\r\n")
        status, _, body = read_response(sock)
    assert status == 422, body[:300]
    assert not staged


def test_an_upload_whose_client_left_is_not_published(tiny_model_dir, server, tmp_path):
    """The store's lock holds the upload just before publishing; the client leaves meanwhile."""
    from tests.api.adapter_http import adapter_files, build_adapter, load_tiny
    from tests.api.raw_http import connect
    from tests.harness import app_of, wait_until

    url, store_root = server
    adapter = build_adapter(load_tiny(tiny_model_dir), "lora_qv", tmp_path / "lora")
    store = app_of(url).state.services.store
    before = store_files(store_root)
    request = httpx.Request("PUT", f"{url}/v1/adapters/left", files=adapter_files(adapter))
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host")
    weights = (adapter / "adapter_model.safetensors").stat().st_size
    staged = lambda: [p for p in (store_root / ".tmp").glob("*/adapter_model.safetensors")]  # noqa: E731
    lock = store.lock("default", "left")
    with lock:
        with connect(url) as sock:
            sock.sendall(f"PUT /v1/adapters/left HTTP/1.1\r\nHost: t\r\n{head}\r\n".encode() + body)
            assert wait_until(lambda: any(p.stat().st_size == weights for p in staged()), 30)
            time.sleep(0.5)  # the rest of the body is read and validation runs up to the held lock
        time.sleep(0.5)  # the server sees the disconnect
    assert wait_until(lambda: not staged(), 30)
    assert not store.exists("default", "left")
    assert store_files(store_root) == before
    assert httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 1}, timeout=30).status_code == 200


def test_a_deeply_nested_config_is_a_422(server):
    """CPython's json raises RecursionError (not a ValueError) past ~1000 levels: it must not escape as a 500."""
    url, store = server
    before = store_files(store)
    files = {"config": ("adapter_config.json", b"[" * 100_000 + b"]" * 100_000),
             "weights": ("adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")}
    r = httpx.put(f"{url}/v1/adapters/nested", files=files, timeout=30)
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert "nested too deeply" in r.json()["error"]["message"]
    assert store_files(store) == before

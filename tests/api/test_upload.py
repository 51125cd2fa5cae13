"""Adapter upload parsing: every multipart refusal is a 4xx JSON error that leaves the store as it was."""

from __future__ import annotations

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

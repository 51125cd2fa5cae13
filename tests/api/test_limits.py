"""Limits enforced before the body is read (413 / 401 without `100 Continue`) and slow bodies cut (408)."""

from __future__ import annotations

import time

import pytest

from tests.api.adapter_http import ALICE, store_files, write_keys
from tests.api.raw_http import closed_by_peer, connect, json_body, read_response, trickle
from tests.harness import cpu_settings, running_server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    settings = cpu_settings(tiny_model_dir, root / "store",
                            api_keys=write_keys(root / "keys.json"), max_adapter_bytes=MiB,
                            header_timeout_s=1.0, body_idle_timeout_s=1.0, body_read_timeout_s=2.5)
    with running_server(settings) as url:
        yield url, settings.store


def _put_head(length: int, key: str | None, expect: bool = True) -> bytes:
    lines = ["PUT /v1/adapters/big HTTP/1.1", "Host: t", f"Content-Length: {length}",
             "Content-Type: multipart/form-data; boundary=xyz"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _first_line(sock) -> bytes:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.parametrize("key, status", [(ALICE, 413), (None, 401), ("not-a-key-123", 401)])
def test_refused_on_the_head_before_100_continue(server, key, status):
    url, _ = server
    with connect(url) as sock:
        sock.sendall(_put_head(500 * MiB, key))
        head = _first_line(sock)
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head[:200]  # no "100 Continue" first
        rest = head
        while True:  # the JSON error follows, then the server closes: the body is never read
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    assert b"application/json" in rest and b'"error"' in rest and b"connection: close" in rest.lower()


def test_a_body_within_the_limit_still_gets_100_continue(server):
    url, _ = server
    with connect(url) as sock:
        sock.sendall(_put_head(1000, ALICE))
        assert _first_line(sock).startswith(b"HTTP/1.1 100 ")


def test_a_request_head_trickled_byte_by_byte_is_cut_with_408(server):
    url, _ = server
    with connect(url) as sock:
        started = time.monotonic()
        closed = trickle(sock, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200, 0.1, started + 10)
        elapsed = time.monotonic() - started
        assert closed or closed_by_peer(sock, 5), "the server kept a trickling connection open"
    assert elapsed < 6, elapsed


def test_a_stalled_or_trickled_upload_body_is_cut_with_408_and_leaves_nothing(server):
    url, store = server
    before = store_files(store)
    for interval in (None, 0.3):  # stalls after 10 bytes; or trickles one byte per 0.3 s
        with connect(url) as sock:
            sock.sendall(_put_head(100_000, ALICE, expect=False) + b"--xyz\r\nCon")
            started = time.monotonic()
            if interval is not None:
                trickle(sock, b"x" * 100, interval, started + 8)
            status, headers, body = read_response(sock)
            assert status == 408 and headers["connection"] == "close", (status, headers, body)
            assert json_body(body)["error"]["type"] == "request_timeout"
            assert time.monotonic() - started < 8
    assert store_files(store) == before

"""Malformed HTTP, refused by h11 before any app code runs, is still answered in JSON."""

from __future__ import annotations

import pytest

from tests.api.raw_http import closed_by_peer, connect, json_body, read_response
from tests.harness import running_server


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory):
    from server.settings import Settings

    settings = Settings(model=str(tiny_model_dir), store=tmp_path_factory.mktemp("store"), device="cpu",
                        dtype="float32")
    with running_server(settings) as base_url:
        yield base_url


CASES = {
    "bad_content_length": (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 12abc\r\n\r\n", 400),
    "nul_in_header": (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Evil: a\x00b\r\n\r\n", 400),
    "missing_host": (b"GET /health HTTP/1.1\r\n\r\n", 400),
    "two_content_lengths": (b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                            400),
    "bad_request_line": (b"GET\x01 /health HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "head_over_h11_buffer": (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 300_000, 431),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_http_is_answered_in_json(url, case):
    raw, status = CASES[case]
    with connect(url) as sock:
        sock.sendall(raw)
        got, headers, body = read_response(sock)
        assert got == status, (got, headers, body)
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        error = json_body(body)["error"]
        assert error["type"] and error["message"].startswith("malformed HTTP request"), error
        assert closed_by_peer(sock)


def test_an_over_long_path_is_a_json_414(url):
    with connect(url) as sock:
        sock.sendall(b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 414 and json_body(body)["error"]["type"] == "uri_too_long", (status, body[:200])

"""The catch-all: an unexpected exception is a JSON 500 with the request id, and the connection lives on."""

from __future__ import annotations

import pytest

from server.app import create_app
from tests.api.raw_http import connect, json_body, read_response
from tests.harness import running_server


@pytest.fixture
def server_with_a_bug(tiny_settings):
    app = create_app(tiny_settings)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    with running_server(app) as url:
        yield url


def test_an_unexpected_exception_is_a_json_500_and_the_connection_stays_usable(server_with_a_bug):
    with connect(server_with_a_bug) as sock:
        sock.sendall(b"GET /bug HTTP/1.1\r\nHost: t\r\nX-Request-ID: trace-me-42\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 500 and headers["content-type"] == "application/json", (status, headers, body)
        error = json_body(body)["error"]
        assert error["type"] == "internal_error" and error["request_id"] == "trace-me-42"
        assert "trace-me-42" in error["message"] and headers["x-request-id"] == "trace-me-42"
        assert b"secret" not in body and b"Traceback" not in body
        assert headers.get("connection") != "close"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")  # the same connection serves the next request
        status, _, body = read_response(sock)
        assert status == 200 and json_body(body) == {"status": "ok"}

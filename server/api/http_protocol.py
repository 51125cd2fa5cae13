"""uvicorn's h11 protocol with two changes: malformed HTTP is answered in JSON, and headers have a deadline.

Why a subclass: h11 rejects a bad request line or header (bad Content-Length,
NUL in a header, missing Host, a head over the size limit) before any ASGI app
runs, and uvicorn answered it with a plain-text 400. And uvicorn bounds only the
idle time *between* requests (its keep-alive timer, which every received byte
resets): a client trickling a request head one byte at a time held its
connection forever (slowloris). Here the head of each request must arrive
within `header_timeout_s` of the connection opening or of the previous
response, else the connection is closed with a JSON 408.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

STATUS_TYPES = {400: "invalid_request_error", 408: "request_timeout", 414: "uri_too_long",
                431: "request_header_fields_too_large"}
MAX_DETAIL_CHARS = 200


class RecordingConnection(h11.Connection):
    """h11's connection, remembering why it refused the peer's bytes (uvicorn keeps only 'invalid request')."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


def error_bytes(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": {"type": STATUS_TYPES.get(status, "invalid_request_error"), "message": message}})
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    return headers, body.encode()


class JsonH11Protocol(H11Protocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, header_timeout_s: float) -> None:
        super().__init__(config, server_state, app_state, _loop)
        size = config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self.conn = RecordingConnection(h11.SERVER, max_incomplete_event_size=size)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's head has the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is being served: its head arrived in time
        message = f"the request head did not arrive within {self.header_timeout_s:g} s"
        headers, body = error_bytes(408, message)
        # h11 cannot frame a response before a request was parsed; the connection closes right after.
        head = b"HTTP/1.1 408 Request Timeout\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        self.transport.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        error = self.conn.last_error  # type: ignore[attr-defined]
        status = error.error_status_hint if error is not None else 400
        detail = str(error)[:MAX_DETAIL_CHARS] if error is not None and str(error) else msg
        headers, body = error_bytes(status, f"malformed HTTP request: {detail}")
        headers.append((b"content-length", str(len(body)).encode()))
        for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def json_h11_protocol(header_timeout_s: float) -> Callable[..., JsonH11Protocol]:
    """What `uvicorn.Config(http=...)` takes: it calls it with (config, server_state, app_state, _loop)."""
    return functools.partial(JsonH11Protocol, header_timeout_s=header_timeout_s)

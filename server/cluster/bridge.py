"""HTTP requests across a Ray handle: a picklable request head in, the app's ASGI messages out.

Why not Serve's own HTTP ingress on the replicas: its proxy routes by a header
(`serve_multiplexed_model_id`) that clients do not send, while our adapter id is
in the JSON body; so our ingress reads the body, picks the id, and hands the
request to a replica through a handle. On the replica, `call_app` runs the
unchanged FastAPI app on it (auth, limits, errors, streaming) and yields what
the app sends: the status and headers first, then body chunks as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    query_string: bytes
    headers: Headers
    client: tuple[str, int] | None
    server: tuple[str, int] | None

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> "RequestHead":
        return cls(scope["method"], scope["path"], scope.get("query_string", b""),
                   [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
                   tuple(scope["client"]) if scope.get("client") else None,  # type: ignore[arg-type]
                   tuple(scope["server"]) if scope.get("server") else None)  # type: ignore[arg-type]

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "scheme": "http", "method": self.method, "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": list(self.headers),
                "client": self.client, "server": self.server, "state": {}}

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers


async def call_app(app: Any, head: RequestHead, body: bytes) -> AsyncIterator[ResponseStart | bytes]:
    """Run one request through an ASGI app; yields a ResponseStart, then the body's chunks.
    Closing the iterator early (the client left) is the app's `http.disconnect`."""
    out: asyncio.Queue[ResponseStart | bytes | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            await out.put(ResponseStart(message["status"], [(bytes(k), bytes(v)) for k, v in message["headers"]]))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await out.put(bytes(message["body"]))
            if not message.get("more_body", False):
                await out.put(None)

    async def run() -> None:
        try:
            await app(head.scope(), receive, send)
        finally:
            await out.put(None)  # the app returned (or raised) without finishing its answer

    task = asyncio.create_task(run())
    try:
        while (item := await out.get()) is not None:
            yield item
        await task  # surfaces an exception the app's own handlers let through
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

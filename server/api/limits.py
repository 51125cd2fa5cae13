"""Request limits as a tiny ASGI middleware: 413 for bodies, 414 / 431 for targets / headers, 408 for slow bodies.

Why not rely on uvicorn alone: h11 answers oversized headers with a bare 400,
and nothing in uvicorn bounds a body, in size or in time. This checks
`Content-Length` up front and counts streamed (chunked) bodies as they arrive,
so a handler never reads more than the limit; and each body read waits at most
`body_idle_timeout_s`, the whole body `body_read_timeout_s` (slowloris).
Adapter uploads get their own, larger size limit.

A body over the declared limit is refused *before reading it*: uvicorn sends
`100 Continue` only when the app first calls `receive()`, so a client that
asked `Expect: 100-continue` gets the 413 without sending a byte; one that
did not is already sending, and a bounded part is dropped so it reads the answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings

UPLOAD_OVERHEAD = 1024 * 1024  # multipart framing + adapter_config.json
# Read (and drop) up to this much of an oversized body before answering, when the
# client is already sending it: closing a socket with unread input makes the kernel
# send RST, and most clients then lose the 413 they were about to read. Past it (or
# after DISCARD_TIMEOUT_S) we answer and close anyway.
DISCARD_MAX = 64 * 1024 * 1024
DISCARD_TIMEOUT_S = 10.0


def body_limit_for(settings: Settings) -> Callable[[Scope], int]:
    def limit(scope: Scope) -> int:
        if scope.get("method") == "PUT" and scope.get("path", "").startswith("/v1/adapters/"):
            return settings.max_adapter_bytes + UPLOAD_OVERHEAD
        if scope.get("method") == "POST" and scope.get("path", "") == "/v1/training/jobs/upload":
            return settings.max_train_upload_bytes + UPLOAD_OVERHEAD
        return settings.max_body_bytes
    return limit


class SizeLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_header_bytes = settings.max_header_bytes
        self.body_limit = body_limit_for(settings)
        self.idle_timeout = settings.body_idle_timeout_s
        self.read_timeout = settings.body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if target > self.max_header_bytes:
            await discard_unread(scope, receive)
            await _reject(send, 414, "uri_too_long", f"the request target exceeds {self.max_header_bytes} bytes")
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if header_bytes > self.max_header_bytes:
            await discard_unread(scope, receive)
            await _reject(send, 431, "request_header_fields_too_large",
                          f"request headers exceed {self.max_header_bytes} bytes")
            return
        limit = self.body_limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await discard_unread(scope, receive)
            await _reject(send, 413, "payload_too_large", f"request body exceeds {limit} bytes")
            return
        await self._guarded(scope, receive, send, limit)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Count a body that arrives without (or lying about) Content-Length, and bound its time.

        Raising HTTPException from `receive` is what FastAPI re-raises as-is
        while parsing a body, so the app's handler answers 413 / 408 JSON.
        Once the body is complete, `receive` waits untimed (disconnect watchers).
        """
        seen = 0
        body_done = timed_out = False
        deadline: float | None = None
        loop = asyncio.get_running_loop()

        async def guarded_receive() -> Message:
            nonlocal seen, body_done, timed_out, deadline
            if body_done:
                return await receive()
            deadline = deadline or loop.time() + self.read_timeout
            try:
                async with asyncio.timeout(max(0.0, min(self.idle_timeout, deadline - loop.time()))):
                    message = await receive()
            except TimeoutError:
                timed_out = True
                idle = loop.time() < deadline
                raise HTTPException(408, f"no request body bytes for {self.idle_timeout:g} s" if idle else
                                    f"the request body did not arrive within {self.read_timeout:g} s") from None
            if message["type"] != "http.request":
                return message
            body_done = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > limit:
                if not body_done:
                    await _discard_body(receive, DISCARD_MAX)
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        async def closing_send(message: Message) -> None:
            if timed_out and message["type"] == "http.response.start":  # a slow client is not kept around
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, guarded_receive, closing_send)


def expects_continue(scope: Scope) -> bool:
    return any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope.get("headers", ()))


async def discard_unread(scope: Scope, receive: Receive, budget: int = DISCARD_MAX) -> None:
    """Before refusing a request whose body is not read: drop what the client is already sending.

    Nothing is read when the client waits for `100 Continue` (it will not be
    sent: the refusal goes out first, with `Connection: close`), and at most
    `budget` bytes for `DISCARD_TIMEOUT_S` otherwise.
    """
    if expects_continue(scope):
        return
    try:
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            await _discard_body(receive, budget)
    except TimeoutError:
        return


async def _discard_body(receive: Receive, budget: int) -> None:
    seen = 0
    while seen <= budget:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _reject(send: Send, status: int, type_: str, message: str) -> None:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

"""Request size limits as a tiny ASGI middleware: 413 for bodies, 431 for headers.

Why not rely on uvicorn alone: h11 answers oversized headers with a bare 400,
and nothing in uvicorn bounds a body. This checks `Content-Length` up front and
counts streamed (chunked) bodies as they arrive, so a handler never reads more
than the limit. Adapter uploads get their own, larger limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings

UPLOAD_OVERHEAD = 1024 * 1024  # multipart framing + adapter_config.json
# Read (and drop) up to this much of an oversized body before answering: closing
# a socket with unread input makes the kernel send RST, and most clients then
# lose the 413 they were about to read. Past it we answer and close anyway.
DISCARD_MAX = 64 * 1024 * 1024


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if header_bytes > self.max_header_bytes:
            await _reject(send, 431, "request_header_fields_too_large",
                          f"request headers exceed {self.max_header_bytes} bytes")
            return
        limit = self.body_limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _discard_body(receive, limit + DISCARD_MAX)
            await _reject(send, 413, "payload_too_large", f"request body exceeds {limit} bytes")
            return
        await self._guarded(scope, receive, send, limit)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Count a body that arrives without (or lying about) Content-Length.

        Raising HTTPException from `receive` is what FastAPI re-raises as-is
        while parsing a body, so the app's handler answers 413 JSON.
        """
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if message.get("more_body", False):
                        await _discard_body(receive, DISCARD_MAX)
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


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

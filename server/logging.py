"""Structured JSON logs and request ids.

Every HTTP request gets an id: the client's `X-Request-ID` when it is a sane
token (≤128 chars of `[A-Za-z0-9._:-]`), otherwise a fresh one. It is echoed
in the response header, carried in a context variable (so every log line
written while serving the request, including in the threadpool, names it) and
written in one access line per request. Why our own access line instead of
uvicorn's: it knows the request id, the tenant and the duration, and it never
writes the query string (where tokens and tenants may travel).

Prompt and completion text never reach the logs unless `settings.log_prompts`
is set: a multi-tenant server's logs are read by operators, not tenants.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PRINCIPAL_SCOPE_KEY = "loraplex.principal"  # where server.api.auth puts the caller in the ASGI scope

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("loraplex_request_id", default=None)
access_log = logging.getLogger("loraplex.access")
generation_log = logging.getLogger("loraplex.generation")

# Attributes every LogRecord has; anything else was passed through `extra=` and is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                          "color_message"}  # uvicorn's ANSI copy


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Root handler on stderr (JSON or plain text); uvicorn's loggers propagate into it."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:20]}"


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            return text if REQUEST_ID_RE.fullmatch(text) else new_request_id()
    return new_request_id()


class RequestIdMiddleware:
    """Outermost ASGI layer: assign/echo X-Request-ID, set the context variable, write the access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope.get("headers", []))
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _log_access(scope, rid, status, time.perf_counter() - started)
            request_id_var.reset(token)


def _log_access(scope: Scope, rid: str, status: int, seconds: float) -> None:
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    access_log.info("%s %s %d", scope.get("method"), scope.get("path"), status, extra={
        "request_id": rid, "method": scope.get("method"), "path": scope.get("path"), "status": status,
        "duration_ms": round(seconds * 1000, 2), "tenant": principal.tenant if principal is not None else None})


def log_generation(*, route: str, engine_request_id: str, adapter: str, finish_reason: str,
                   prompt_tokens: int, completion_tokens: int, seconds: float,
                   prompt_text: str | None = None) -> None:
    """One line per finished generation; `prompt_text` only when settings.log_prompts allowed it."""
    extra: dict[str, Any] = {
        "route": route, "generation_id": engine_request_id, "adapter": adapter, "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "duration_ms": round(seconds * 1000, 2), "request_id": request_id_var.get()}
    if prompt_text is not None:
        extra["prompt"] = prompt_text
    generation_log.info("generation %s %s", finish_reason, engine_request_id, extra=extra)

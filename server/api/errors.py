"""Exception handlers: every error is JSON `{"error": {...}}`, never a traceback.

Native routes answer validation errors with 422; the OpenAI-compatible routes
(`/v1/models`, `/v1/completions`, `/v1/chat/completions`) with 400 and OpenAI's
error shape (`message`, `type`, `param`, `code`).

Anything unexpected is caught by `CatchAllMiddleware`, inside the request-id
layer: a JSON 500 naming the request id, and the connection stays open (an
exception that reached uvicorn made it log a traceback and drop the connection).
"""

from __future__ import annotations

import functools
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.adapters.ids import InvalidName
from server.errors import ApiError, InsufficientStorage, InvalidRequest, is_out_of_space
from server.logging import request_id_var

log = logging.getLogger(__name__)

OPENAI_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models")


def is_openai_route(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


# Error types of the HTTP-level refusals (Starlette's HTTPException, the limits' 408 / 413).
HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 408: "request_timeout",
                    413: "payload_too_large"}


def error_response(request: Request, status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None, param: str | None = None,
                   request_id: str | None = None) -> JSONResponse:
    openai = is_openai_route(request.url.path)
    if openai and status == 422:
        status = 400
    body: dict = {"type": type_, "message": message}
    if openai:
        body.update(param=param, code=type_)
    if request_id is not None:
        body["request_id"] = request_id
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError, content_type: str = "") -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors()[:5]:
        special = _body_not_json(err, content_type)
        if special is not None:
            return special, "body"
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def _body_not_json(err: dict, content_type: str) -> str | None:
    """Say what is wrong when the body never became JSON (FastAPI reports a position or a type error).

    Why: "1: JSON decode error" and "body: Input should be a valid dictionary" name
    neither the cause nor the fix. The body itself is never echoed (it may be a prompt).
    """
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        where = f" at position {loc[1]}" if len(loc) > 1 else ""
        reason = (err.get("ctx") or {}).get("error", "malformed")
        return f"body is not valid JSON{where}: {reason}"
    if loc == ("body",) and isinstance(err.get("input"), bytes | str) and "json" not in content_type.lower():
        return (f"body must be a JSON object sent with 'Content-Type: application/json' "
                f"(got Content-Type {content_type or 'none'!r})")
    return None


def allowed_methods(request: Request) -> list[str]:
    """Methods the published spec lists for this request's path.

    Why: Starlette's 405 names only the first matching route's methods, so
    `Allow` was wrong on paths served by two routes (GET and POST
    /v1/training/jobs); the spec is the one list of every public route.
    """
    path = request.scope.get("path", "")
    paths = request.app.openapi().get("paths", {})
    if path in paths:  # a static path wins over templates that also match it (/jobs/upload vs /jobs/{id})
        return sorted(m.upper() for m in paths[path])
    methods: set[str] = set()
    for template, operations in paths.items():
        if _template_regex(template).fullmatch(path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


@functools.lru_cache(maxsize=256)
def _template_regex(template: str) -> re.Pattern[str]:
    """`/v1/adapters/{adapter_id}/merge` → a regex where each `{param}` is one path segment."""
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _unparsable_body(exc: StarletteHTTPException) -> str:
    """FastAPI says only "There was an error parsing the body"; the cause says why."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, UnicodeDecodeError):
        return "body is not valid UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return "body is not valid JSON: nested too deeply"
    return f"request body could not be parsed: {exc.detail}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(InvalidName)
    async def _invalid_name(request: Request, exc: InvalidName) -> JSONResponse:
        """An id or tenant breaking the naming rule (raised by the leaf `adapters.ids`): a 422 like any bad input."""
        return error_response(request, InvalidRequest.status, InvalidRequest.type, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc, request.headers.get("content-type", ""))
        return error_response(request, 422, "invalid_request_error", message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI/Starlette could not parse the body: a client error like any other
            return error_response(request, 422, "invalid_request_error", _unparsable_body(exc), param="body")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(request, exc.status_code, HTTP_ERROR_TYPES.get(exc.status_code, "http_error"),
                              str(exc.detail), headers or None)


def unexpected_error_response(request: Request, exc: BaseException) -> JSONResponse:
    """A JSON 5xx for an exception no handler knew: 507 for a full disk, else 500 with the request id."""
    if is_out_of_space(exc):  # e.g. publishing or the job queue's database hit a full disk
        log.error("out of disk space on %s %s: %s", request.method, request.url.path, exc)
        full = InsufficientStorage()
        return error_response(request, full.status, full.type, full.message, full.headers)
    rid = request_id_var.get()
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, "internal_error",
                          f"internal server error; quote request id {rid} when reporting it", request_id=rid)


class CatchAllMiddleware:
    """Turn any exception that escaped the app into a JSON 500 (no traceback) on a connection that stays open.

    Once a response has started nothing can be sent in its place: the exception
    goes on to uvicorn, which ends that connection (the client sees a cut stream).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: nothing unexpected reaches uvicorn
            if started:
                raise
            await unexpected_error_response(Request(scope), exc)(scope, receive, send)

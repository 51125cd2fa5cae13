"""Typed exceptions for everything the server (or the network) can say no with.

The server answers every error as `{"error": {"type": str, "message": str}}`;
the exception carries that message verbatim so a user sees the server's words,
not a generic "400 Bad Request". The class is chosen by HTTP status, so callers
can `except NotFoundError` without parsing strings.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class LoraplexError(Exception):
    """Base of every error the client raises."""

    exit_code: int = 1  # the CLI's exit status for this class

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(LoraplexError, ValueError):
    """Caught on this side before any request: a missing file, a bad JSONL line."""

    exit_code = 6


class ConnectionFailedError(LoraplexError):
    """The server could not be reached (after the allowed retries)."""

    exit_code = 3


class WaitTimeoutError(LoraplexError, TimeoutError):
    """`wait()` gave up before the job reached a terminal status."""

    exit_code = 14


class ApiError(LoraplexError):
    """An HTTP error answer; `status`, `type` and `message` come from the server."""

    def __init__(self, message: str, *, status: int, type: str = "error",
                 body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.body = body
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status}, {self.type})"

    @property
    def retry_after(self) -> float | None:
        """The server's `Retry-After` hint in seconds (429/503), else None."""
        return parse_retry_after(self.headers.get("retry-after"))


class ValidationError(ApiError):
    """422 on native routes, 400 on the OpenAI-compatible ones."""

    exit_code = 6


class AuthError(ApiError):
    """401 (missing or unknown key) or 403."""

    exit_code = 4


class NotFoundError(ApiError):
    """404: also what another tenant's adapter looks like (existence is not leaked)."""

    exit_code = 5


class ConflictError(ApiError):
    """409: e.g. an idempotency key reused with a different body."""

    exit_code = 7


class PayloadTooLargeError(ApiError):
    """413 (body or adapter over the size limit) and 431 (headers too large)."""

    exit_code = 8


class RateLimitError(ApiError):
    """429: the request queue is full; see `retry_after`."""

    exit_code = 9


class UnavailableError(ApiError):
    """503: not ready yet, or draining for shutdown."""

    exit_code = 10


class ServerError(ApiError):
    """Any other 5xx: a server bug, never the caller's fault."""

    exit_code = 11


_BY_STATUS: dict[int, type[ApiError]] = {
    400: ValidationError, 422: ValidationError, 401: AuthError, 403: AuthError,
    404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError, 431: PayloadTooLargeError,
    429: RateLimitError, 503: UnavailableError,
}


def error_class(status: int) -> type[ApiError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ApiError


def error_from_response(response: httpx.Response) -> ApiError:
    """Build the typed error from a (fully read) error response."""
    body: Any = None
    message, type_ = "", "error"
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        message = str(detail.get("message") or "")
        type_ = str(detail.get("type") or detail.get("code") or type_)
    elif isinstance(body, dict) and "detail" in body:  # a plain FastAPI error, just in case
        message = str(body["detail"])
    if not message:
        text = response.text.strip()[:500] if response.content else ""
        message = text or response.reason_phrase or f"HTTP {response.status_code}"
    cls = error_class(response.status_code)
    headers = {k.lower(): v for k, v in response.headers.items()}
    return cls(message, status=response.status_code, type=type_, body=body, headers=headers)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import datetime, timezone
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())

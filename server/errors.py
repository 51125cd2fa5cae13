"""Errors that cross the HTTP boundary.

Everything a client can cause is an `ApiError` with a status and a message; the
app's exception handlers turn it into `{"error": {"type", "message"}}` (OpenAI
routes add `param`/`code`). Nothing else ever reaches a client verbatim.
"""

from __future__ import annotations


class ApiError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}


class InvalidRequest(ApiError):
    """Semantically bad input (422 native, 400 on OpenAI routes)."""
    status = 422
    type = "invalid_request_error"


class NotFound(ApiError):
    status = 404
    type = "not_found"


class Unauthorized(ApiError):
    status = 401
    type = "unauthorized"


class Conflict(ApiError):
    status = 409
    type = "conflict"


class ClientGone(ApiError):
    """The client disconnected before its request took effect; nothing was done (nginx's 499: nobody reads it)."""
    status = 499
    type = "client_closed_request"


class PayloadTooLarge(ApiError):
    status = 413
    type = "payload_too_large"


class QueueFull(ApiError):
    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str = "the request queue is full; retry later", retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class RateLimited(ApiError):
    """One of the caller's tenant limits is reached; `limit` names it (metrics), Retry-After says when to retry."""
    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, limit: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.limit = limit
        self.retry_after = retry_after


class Unavailable(ApiError):
    status = 503
    type = "unavailable"

    def __init__(self, message: str = "the server is not accepting requests", retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class StoreUnavailable(ApiError):
    """The shared adapter store (an S3 bucket) could not be reached or gave bytes that fail their checksum:
    not the client's fault, and retrying later may work. Never names the bucket or the cause to clients."""
    status = 503
    type = "store_unavailable"

    def __init__(self, message: str = "the adapter store is unreachable; retry later", retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class InsufficientStorage(ApiError):
    """The server's disk is full (ENOSPC / EDQUOT): not the client's fault, and retrying later may work."""
    status = 507
    type = "insufficient_storage"

    def __init__(self, message: str = "the server is out of disk space; nothing was stored, retry later",
                 retry_after: int = 30) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


NO_SPACE_ERRNOS = frozenset({28, 122})  # ENOSPC, EDQUOT (Linux numbering; errno names differ per platform)


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


class AdapterError(InvalidRequest):
    """An adapter that cannot be served: the message names the reason."""
    type = "invalid_adapter"

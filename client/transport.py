"""The one place where sync and async differ: running an operation.

Every API operation (client/ops.py) is written once as a generator that yields
instructions — `HttpRequest` (send it, give me the response) or `Sleep` — and
returns the parsed result. `run_sync` and `run_async` are the two drivers that
carry those instructions out with httpx.Client / httpx.AsyncClient. So request
building, retries, response parsing and polling loops exist exactly once.

A network failure is thrown back into the generator (`gen.throw`) so the retry
decision also lives in the shared code, not in the drivers.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from client.errors import ConnectionFailedError, error_from_response, parse_retry_after
from client.retry import IDEMPOTENT_METHODS, RetryPolicy

T = TypeVar("T")


@dataclass
class HttpRequest:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None  # plain multipart form fields, sent beside `files`
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False  # the driver returns the response open, body unread
    retry_safe: bool | None = None  # may be resent after a partial send; None: decide by method/key

    def may_resend(self) -> bool:
        if self.retry_safe is not None:
            return self.retry_safe
        return (self.method.upper() in IDEMPOTENT_METHODS
                or any(k.lower() == "idempotency-key" for k in self.headers))


@dataclass
class Sleep:
    seconds: float


@dataclass
class Await:
    """Wraps an awaitable a user callback returned; only the async driver can run it."""

    awaitable: Any


Instruction = HttpRequest | Sleep | Await
Op = Generator[Instruction, Any, T]


def send(req: HttpRequest, policy: RetryPolicy) -> Op[httpx.Response]:
    """Send with retries; return a 2xx response or raise the typed error."""
    attempt = 0
    while True:
        attempt += 1
        try:
            response: httpx.Response = yield req
        except httpx.TransportError as exc:
            if not policy.retry_transport(exc, req.may_resend(), attempt):
                raise ConnectionFailedError(f"{req.method} {req.path}: {type(exc).__name__}: {exc}") from exc
            yield Sleep(policy.backoff(attempt))
            continue
        if response.is_success:
            return response
        if policy.retry_status(response.status_code, attempt):
            yield Sleep(policy.delay(attempt, parse_retry_after(response.headers.get("retry-after"))))
            continue
        raise error_from_response(response)


def _build(http: httpx.Client | httpx.AsyncClient, req: HttpRequest) -> httpx.Request:
    return http.build_request(req.method, req.path, json=req.json, params=req.params,
                              data=req.data, files=req.files, headers=req.headers)


def run_sync(op: Op[T], http: httpx.Client) -> T:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            instr = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if isinstance(instr, Sleep):
            time.sleep(instr.seconds)
        elif isinstance(instr, Await):
            op.close()
            getattr(instr.awaitable, "close", lambda: None)()  # a coroutine we will not run
            raise TypeError("a callback returned an awaitable; use AsyncClient for async callbacks")
        else:
            try:
                value = http.send(_build(http, instr), stream=instr.stream)
                if instr.stream and not value.is_success:
                    value.read()  # the error body is needed to build the exception
                    value.close()
            except httpx.TransportError as exc:
                error = exc


async def run_async(op: Op[T], http: httpx.AsyncClient) -> T:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            instr = op.throw(error) if error is not None else op.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        if isinstance(instr, Sleep):
            await asyncio.sleep(instr.seconds)
        elif isinstance(instr, Await):
            value = await instr.awaitable
        else:
            try:
                value = await http.send(_build(http, instr), stream=instr.stream)
                if instr.stream and not value.is_success:
                    await value.aread()
                    await value.aclose()
            except httpx.TransportError as exc:
                error = exc


def maybe_await(result: Any) -> Op[Any]:
    """Run a user callback's result: awaited under the async driver, else as is."""
    if inspect.isawaitable(result):
        return (yield Await(result))
    return result

"""The cluster's front door: reads each request, picks its adapter's replica, relays the answer.

Serve's HTTP proxy (on `--host/--port`) hands every request to this ASGI app.
The single server's front checks run here first, before a byte of the body is
read: the API key (401) and the size and time limits (413/414/431, 408 for slow
bodies), so an unauthenticated or oversized request never reaches a buffer.
It buffers the body (which the limits bound by its route's), computes
the multiplexed id (server/cluster/affinity.py) and calls a replica through a
handle with it, streaming back whatever the replica's app sends, byte for
byte: the status, headers (X-Request-ID included) and chunks (SSE flushes as
the replica produces them). `/ready` and `/metrics` span every replica
(server/cluster/board.py). A replica that dies mid-request fails that request
with a JSON 503 (before the answer starts) or an SSE error event (after),
never a hang; Serve restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException

from starlette.exceptions import HTTPException
from starlette.requests import Request

from server.api.auth import AuthMiddleware
from server.api.errors import HTTP_ERROR_TYPES, error_response
from server.api.keys import ApiKeys, authenticate
from server.api.limits import SizeLimitMiddleware
from server.cluster.affinity import affinity_id
from server.cluster.bridge import RequestHead, ResponseStart
from server.cluster.board import readiness, render_metrics
from server.settings import Settings

log = logging.getLogger(__name__)

REPLICA_DEPLOYMENT = "Replica"
REQUEST_ID = b"x-request-id"
FULL = "the server is at capacity (every replica busy, the queue full); retry later"
LOST = "the replica serving this request stopped (Ray restarts it); retry the request"


class Ingress:
    def __init__(self, replicas: Any, board: Any, settings: Settings, keys: ApiKeys | None,
                 affinity: bool = True) -> None:
        """`affinity=False`: no multiplexed id, Serve's plain load balancing (the bench's baseline)."""
        self.replicas = replicas
        self.affinity = affinity
        self.board = board
        self.wanted = settings.replicas
        self.keys = keys
        self._front = AuthMiddleware(SizeLimitMiddleware(self._forward, settings=settings), keys=keys)
        self._base_model_id: str | None = None
        self.app_name = serve.get_replica_context().app_name

    def __serve_build_asgi_app__(self) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # a plain function: ASGI 3
            await self.asgi(scope, receive, send)

        return app

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await self._front(scope, receive, send)

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Behind the key and limit checks: read the body, relay it to a replica."""
        head = RequestHead.from_scope(scope)
        try:
            body = await _read_body(receive)
        except HTTPException as exc:  # the limits' 413 (a chunked body past it) or 408 (a slow body)
            response = error_response(Request(scope), exc.status_code, HTTP_ERROR_TYPES[exc.status_code],
                                      str(exc.detail))
            await response(scope, receive, send)
            return
        if body is None:  # the client left mid-body: nothing to relay (a single server would drop it too)
            return
        try:
            await self._relay(head, body, send)
        except BackPressureError:  # every replica is busy and the router's queue is full: one server's 429
            await _send_error(send, 429, "rate_limit_exceeded", FULL)
        except (RayError, RayServeException):  # raised before the answer started (after it, _relay ends it)
            log.exception("relaying %s %s failed", head.method, head.path)
            await _send_error(send, 503, "unavailable", LOST)

    async def _relay(self, head: RequestHead, body: bytes, send: Any) -> None:
        model_id = affinity_id(head, body, self.keys, await self._base_model()) if self.affinity else ""
        stream = self.replicas.options(multiplexed_model_id=model_id, stream=True).handle.remote(head, body)
        start: ResponseStart = await stream.__anext__()
        start = await self._span_cluster(head, start, stream)
        if isinstance(start, tuple):  # the cluster-wide answer replaces the replica's
            start, whole = start
            await send({"type": "http.response.start", "status": start.status, "headers": start.headers})
            await send({"type": "http.response.body", "body": whole})
            return
        await send({"type": "http.response.start", "status": start.status, "headers": _own_headers(head, start)})
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (RayError, RayServeException):
            log.exception("replica lost mid-answer: %s %s", head.method, head.path)
            if sse:
                error = {"error": {"message": LOST, "type": "unavailable", "param": None, "code": "unavailable"}}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _span_cluster(self, head: RequestHead, start: ResponseStart, stream: Any) -> Any:
        """/ready and /metrics answered 200 by one replica (auth and all) become the cluster's answer."""
        if head.method != "GET" or head.path not in ("/ready", "/metrics") or start.status != 200:
            return start
        async for _ in stream:  # the replica's own body: replaced
            pass
        posts = await self.board.fresh.remote()
        headers = [(k, v) for k, v in _own_headers(head, start) if k.lower() != b"content-length"]
        if head.path == "/ready":
            ok, reason = readiness(posts, self.wanted)
            running = await asyncio.to_thread(_running_replicas, self.app_name)
            if ok and running < self.wanted:  # a replica died within its last post's freshness
                ok, reason = False, f"{running} of {self.wanted} replicas running"
            if ok:
                body = json.dumps({"ready": True, "model": await self._base_model(), "replicas": len(posts)})
                return ResponseStart(200, headers), body.encode()
            body = json.dumps({"ready": False, "reason": reason})
            return ResponseStart(503, [*headers, (b"retry-after", b"5")]), body.encode()
        principal = authenticate(self.keys, head.headers)  # the replica accepted these very headers
        everything = self.keys is None or (principal is not None and principal.admin)
        tenant = None if everything or principal is None else principal.tenant
        return ResponseStart(200, headers), render_metrics(posts, tenant)

    async def _base_model(self) -> str:
        if self._base_model_id is None:
            self._base_model_id = await self.replicas.model_id.remote()
        return self._base_model_id


def _own_headers(head: RequestHead, start: ResponseStart) -> list[tuple[bytes, bytes]]:
    """The replica's headers less the X-Request-ID Serve's proxy appends itself (it gave the request that
    id, or passed the client's on, and the app echoed it): one header, as from one server."""
    asked = head.header(REQUEST_ID)
    return [(k, v) for k, v in start.headers if not (k.lower() == REQUEST_ID and v == asked)]


def _running_replicas(app_name: str) -> int:
    """Replicas Serve reports RUNNING (a dead one is gone from this count before its posts go stale)."""
    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get(REPLICA_DEPLOYMENT) if app is not None else None
    if deployment is None:
        return 0
    return sum(n for state, n in deployment.replica_states.items() if getattr(state, "value", state) == "RUNNING")


async def _read_body(receive: Any) -> bytes | None:
    """The whole body (the limits in front raise 413 past its route's limit, 408 when it is slow); None when
    the client disconnects first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_error(send: Any, status: int, type_: str, message: str) -> None:
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})

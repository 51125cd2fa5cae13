"""`loraplex serve --replicas N`: the Serve application, and the process that runs it until a signal.

The driver (this process) joins Ray (`--ray-address`, else RAY_ADDRESS, else a
fresh local instance), sweeps the store once while no replica runs (taking its
lock exclusively for that moment, then shared for its lifetime so a single
server cannot open it meanwhile), starts Serve's HTTP proxy on the configured
host/port and deploys: a Board, N Replicas and the Ingress. SIGTERM/SIGINT:
Serve stops routing new requests, lets every replica finish its in-flight ones
(`drain_timeout_s`), runs each replica's shutdown (jobs requeued, store
closed), exits 0.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any

import ray
from ray import serve

from server.adapters.store.store import AdapterStore
from server.adapters.store.store_lock import acquire_store_lock
from server.api.keys import ApiKeys
from server.cluster.board import Board
from server.cluster.ingress import REPLICA_DEPLOYMENT, Ingress
from server.cluster.replica import replica_class
from server.settings import Settings

log = logging.getLogger("loraplex")

APP_NAME = "loraplex"
DRAIN_SLACK_S = 5.0


def build_application(settings: Settings, keys: ApiKeys | None, affinity: bool = True) -> Any:
    """The bound Serve application: Board ← Replicas ← Ingress (handles passed at bind). `affinity=False`
    is the bench's baseline: Serve's plain load balancing, adapters ignored."""
    cpu = settings.torch_device.type != "cuda"
    board = serve.deployment(Board, name="Board", num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()
    replica = serve.deployment(
        replica_class(settings.max_adapters_host), name=REPLICA_DEPLOYMENT, num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0 if cpu else 1},
        # A replica takes what it can batch plus as much again waiting (where fair scheduling orders
        # tenants); past that the router tries another replica, else queues up to `max_queue` (then 429).
        max_ongoing_requests=2 * settings.max_batch, max_queued_requests=settings.max_queue,
        graceful_shutdown_timeout_s=settings.drain_timeout_s + DRAIN_SLACK_S, graceful_shutdown_wait_loop_s=0.2,
        health_check_period_s=2.0, health_check_timeout_s=30.0,
    ).bind(settings, keys, board)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=(2 * settings.max_batch + settings.max_queue) * settings.replicas)
    return ingress.bind(replica, board, settings, keys, affinity)


def http_options(settings: Settings) -> dict[str, Any]:
    """Serve's proxy on our host/port, closing idle keep-alive connections when one server would."""
    return {"host": settings.host, "port": settings.port,
            "keep_alive_timeout_s": max(1, math.ceil(settings.keep_alive_timeout_s))}


def sweep_store(settings: Settings) -> None:
    """The start-up sweep a single server does, done once here while no replica runs."""
    release = acquire_store_lock(settings.store)  # StoreInUse: a server or another cluster holds it
    try:
        AdapterStore(settings.store).sweep()
    finally:
        release()


def serve_cluster(settings: Settings, keys: ApiKeys | None) -> int:
    sweep_store(settings)
    release = acquire_store_lock(settings.store, shared=True)
    try:
        ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=True)
        try:
            return _run(settings, keys)
        finally:
            ray.shutdown()
    finally:
        release()


def _run(settings: Settings, keys: ApiKeys | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    serve.start(http_options=http_options(settings))
    serve.run(build_application(settings, keys), name=APP_NAME, route_prefix="/")
    log.info("cluster serving on %s:%d with %d replicas", settings.host, settings.port, settings.replicas)
    stop.wait()
    log.info("signal: draining every replica")
    serve.delete(APP_NAME)  # graceful: each replica finishes its requests, then its shutdown hooks run
    serve.shutdown()
    return 0

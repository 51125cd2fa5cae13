"""A 2-replica cluster on loopback for the cluster tests: one Ray instance per test module.

Minimal Ray: 2 CPUs (one per replica; the board and ingress take none), no
dashboard, loopback only. Starting Ray and two tiny replicas takes ~15 s here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from server.api.keys import load_keys
from server.settings import Settings
from tests.harness import free_port

REPLICA_HEADER = "x-loraplex-replica"


@contextlib.contextmanager
def running_cluster(settings: Settings, startup_timeout: float = 240.0) -> Iterator[str]:
    import ray
    from ray import serve

    from server.cluster.run import APP_NAME, build_application, http_options, sweep_store

    sweep_store(settings)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options=http_options(settings.model_copy(update={"host": "127.0.0.1", "port": port})))
        serve.run(build_application(settings, load_keys(settings.api_keys)), name=APP_NAME, route_prefix="/",
                  blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, startup_timeout)
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def wait_ready(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = httpx.get(f"{url}/ready", timeout=10)
            if last.status_code == 200:
                return last.json()
        time.sleep(0.25)
    raise TimeoutError(f"cluster not ready in {timeout}s: {last.text if last is not None else 'no answer'}")


def cluster_settings(model_dir: Path, store: Path, keys: Path, **overrides) -> Settings:
    return Settings(model=str(model_dir), device="cpu", dtype="float32", store=store, api_keys=keys, replicas=2,
                    max_batch=4, max_queue=32, tokenize_workers=1, **overrides)


def call_any_replica(path: str, body: dict, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """POST through the replicas' handle with no adapter affinity: Serve picks any replica."""
    import asyncio
    import json

    from ray import serve

    from server.cluster.bridge import RequestHead, ResponseStart
    from server.cluster.run import APP_NAME

    handle = serve.get_deployment_handle("Replica", app_name=APP_NAME).options(stream=True)
    head = RequestHead("POST", path, b"", [(k.lower().encode(), v.encode()) for k, v in
                                           {**headers, "content-type": "application/json"}.items()],
                       ("127.0.0.1", 1), ("127.0.0.1", 2))

    async def run() -> tuple[int, dict[str, str], bytes]:
        start, chunks = None, []
        async for part in handle.handle.remote(head, json.dumps(body).encode()):
            if isinstance(part, ResponseStart):
                start = part
            else:
                chunks.append(part)
        assert start is not None
        return start.status, {k.decode(): v.decode() for k, v in start.headers}, b"".join(chunks)

    return asyncio.run(run())

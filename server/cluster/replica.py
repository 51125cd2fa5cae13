"""One engine replica: the unchanged app (server/app.py) on one base model, fed through the bridge.

Each replica has its own device slots, host LRU, merged copies and training
worker, and shares the store directory (shared lock: server/adapters/store/)
and the job queue (leases: server/training/leases.py) with the others. Serve's
multiplexing is told which adapters this replica has taken (`_adapter`, an LRU
of `max_adapters_host` ids, like the host tier), so the router sends an
adapter's requests here while this replica is not overloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from server.api.keys import ApiKeys
from server.cluster.board import REPORT_EVERY_S
from server.cluster.bridge import RequestHead, ResponseStart, call_app
from server.cluster.merges import MergeFollower
from server.settings import Settings


REPLICA_HEADER = b"x-loraplex-replica"  # which replica answered: for operators and the cluster tests
BOARD_TIMEOUT_S = 2.0


def replica_class(capacity: int) -> type:
    """The deployment class, its multiplexing LRU sized to `capacity` (the host tier's adapters)."""

    class Replica:
        async def __init__(self, settings: Settings, keys: ApiKeys | None, board: Any) -> None:
            from server.app import create_server_app
            from server.logging import configure_logging

            configure_logging(settings.log_level, settings.log_format)
            self.app = create_server_app(settings, keys)  # torch threads: OMP_NUM_THREADS from Ray's num_cpus
            self._life = self.app.router.lifespan_context(self.app)
            await self._life.__aenter__()  # builds the services, starts the engine
            self.services = self.app.state.services
            self.id = serve.get_replica_context().replica_id.unique_id
            self.board = board
            self.merges = MergeFollower(self.services.merge)
            self._tasks = [asyncio.create_task(self._report()), asyncio.create_task(self._follow_shared())]

        @serve.multiplexed(max_num_models_per_replica=capacity)
        async def _adapter(self, model_id: str) -> str:
            """Taking an adapter on: nothing to load ahead (the engine loads it on first use); the
            id's presence in this LRU is what routes its next requests here."""
            return model_id

        async def handle(self, head: RequestHead, body: bytes) -> AsyncIterator[ResponseStart | bytes]:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self._adapter(model_id)
            async for part in call_app(self.app, head, body):
                if isinstance(part, ResponseStart):
                    part = ResponseStart(part.status, [*part.headers, (REPLICA_HEADER, self.id.encode())])
                yield part

        def model_id(self) -> str:
            return str(self.services.base.model_id)

        def check_health(self) -> None:
            """Serve restarts a replica whose engine thread died (its requests would only ever 503)."""
            if not self.services.engine.alive:
                raise RuntimeError("the generation engine is not running")

        async def _report(self) -> None:
            while True:
                with contextlib.suppress(Exception):  # a board restart must not stop the reports
                    ready, reason = self._ready()
                    # A handle call waits for a board replica to exist: bounded, so a missing board never parks us.
                    await asyncio.wait_for(self.board.post.remote(self.id, ready, reason, self._metrics_text()),
                                           BOARD_TIMEOUT_S)
                await asyncio.sleep(REPORT_EVERY_S)

        def _ready(self) -> tuple[bool, str]:
            if not self.services.engine.alive:
                return False, "the generation engine is not running"
            if not self.services.accepting:
                return False, "shutting down"
            return True, ""

        def _metrics_text(self) -> str:
            services = self.services
            services.metrics.queue_depth.set(len(services.engine.waiting))
            services.metrics.running.set(len(services.engine.scheduler.running))
            return services.metrics.render(services, None).decode()

        async def _follow_shared(self) -> None:
            """Also the job queue: another replica's queued job is claimed here when this trainer is idle."""
            while True:
                with contextlib.suppress(Exception):
                    await self.merges.sync()
                    await asyncio.to_thread(self.services.jobs.poll)
                await asyncio.sleep(REPORT_EVERY_S)

        async def __del__(self) -> None:
            """Serve's graceful stop (SIGTERM to the cluster, a scale-down): in-flight requests have
            finished or timed out; drain, stop the engine and run the shutdown hooks as one server does."""
            for task in getattr(self, "_tasks", []):
                task.cancel()
            with contextlib.suppress(Exception):  # at a full stop the board may be gone already
                await asyncio.wait_for(self.board.leave.remote(self.id), BOARD_TIMEOUT_S)
            if hasattr(self, "_life"):
                await self._life.__aexit__(None, None, None)

    return Replica

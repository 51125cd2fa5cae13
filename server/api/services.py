"""The bundle of long-lived objects the routes use, built once in the lifespan.

Routes read it through `get_services(request)`; the app builds every piece
before the bundle (server/app.py) and registers their shutdown hooks (run after
the engine drains, in registration order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.adapters.residency.manager import AdapterManager
from server.adapters.merge.merge import MergeRegistry
from server.adapters.service import AdapterService
from server.adapters.store.protocol import AdapterStorage
from server.api.prompts import PromptEncoder
from server.api.rate_limit import TenantLimiter
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.errors import Unavailable
from server.metrics import Metrics
from server.model.load import BaseModel
from server.settings import Settings
from server.training.service import TrainingService

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    base: BaseModel
    engine: Engine
    metrics: Metrics
    prompts: PromptEncoder  # bounded tokenization
    grammars: GrammarCompiler  # structured output
    store: AdapterStorage
    adapters: AdapterManager  # host and device tiers of adapters
    merge: MergeRegistry  # merged copies for dedicated adapters
    adapter_service: AdapterService  # publish / delete: uploads, trained outputs
    jobs: TrainingService  # training queue and worker
    limiter: TenantLimiter  # per-tenant rate limits at submit
    shutdown_hooks: list[Callable[[], Any]] = field(default_factory=list)
    accepting: bool = True  # False once draining (SIGTERM): new requests get 503

    def add_shutdown_hook(self, hook: Callable[[], Any]) -> None:
        self.shutdown_hooks.append(hook)

    def run_shutdown_hooks(self) -> None:
        """Run every hook; one failing hook must not keep the others from running."""
        for hook in list(self.shutdown_hooks):
            try:
                hook()
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("shutdown hook %r failed", hook)


def get_services(request: Request) -> Services:
    services: Services | None = request.app.state.services
    if services is None:
        raise Unavailable("the server is still starting")
    return services

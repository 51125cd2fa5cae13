"""The bundle of long-lived objects the routes use, built once in the lifespan.

Routes read it through `get_services(request)`; other parts of the server attach
their pieces (`adapters`, `store`, `jobs`) during start-up and register
shutdown hooks (run after the engine drains, in registration order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.errors import Unavailable
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    base: Any  # server.model.load.BaseModel
    engine: Any  # server.engine.engine.Engine
    metrics: Any  # server.metrics.Metrics
    prompts: Any  # server.api.prompts.PromptEncoder (bounded tokenization)
    adapter_limits: Any = None  # server.adapters.limits.AdapterLimits
    adapters: Any = None  # AdapterManager (adapter work); None = base model only
    store: Any = None  # AdapterStore
    merge: Any = None  # MergeRegistry (merge path for dedicated tenants)
    jobs: Any = None  # training queue
    grammars: Any = None  # server.engine.grammar.GrammarCompiler (structured output)
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
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise Unavailable("the server is still starting")
    return services

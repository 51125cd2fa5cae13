"""The cluster's notice board: each replica posts its readiness and metrics every `REPORT_EVERY_S`.

Why a board: a Serve handle reaches *a* replica, never each one, yet `/ready`
must mean "every replica is ready" and `/metrics` must show every replica. So
replicas push (a tiny deployment holds the latest post of each) and the ingress
reads them all in one call. A post older than `STALE_AFTER_S` is a replica that
died or hangs: it no longer counts as ready, and its series drop out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import TenantView

REPORT_EVERY_S = 1.0
STALE_AFTER_S = 5.0
REPLICA_LABEL = "replica"


@dataclass(frozen=True)
class Post:
    replica: str
    ready: bool
    reason: str
    metrics: str  # the replica's full Prometheus text (every tenant's series)
    at: float


class Board:
    """The deployment's class: a dict of the latest posts (no other state, so a restart loses nothing)."""

    def __init__(self) -> None:
        self._posts: dict[str, Post] = {}

    def post(self, replica: str, ready: bool, reason: str, metrics: str) -> None:
        self._posts[replica] = Post(replica, ready, reason, metrics, time.monotonic())

    def leave(self, replica: str) -> None:
        self._posts.pop(replica, None)

    def fresh(self) -> list[Post]:
        now = time.monotonic()
        return sorted((p for p in self._posts.values() if now - p.at <= STALE_AFTER_S), key=lambda p: p.replica)


def readiness(posts: list[Post], wanted: int) -> tuple[bool, str]:
    """(every wanted replica ready, why not)."""
    ready = [p for p in posts if p.ready]
    if len(ready) >= wanted:
        return True, ""
    reasons = sorted({p.reason for p in posts if not p.ready and p.reason})
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    return False, f"{len(ready)} of {wanted} replicas ready{detail}"


def render_metrics(posts: list[Post], tenant: str | None) -> bytes:
    """Every replica's series, each labelled `replica="<id>"`; `tenant` set: that tenant's view only."""
    collector = _Labelled(posts)
    return generate_latest(collector if tenant is None else TenantView(collector, tenant))  # type: ignore[arg-type]


class _Labelled:
    def __init__(self, posts: list[Post]) -> None:
        self.posts = posts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for post in self.posts:
            for family in text_string_to_metric_families(post.metrics):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples += [s._replace(labels={**s.labels, REPLICA_LABEL: post.replica})
                                   for s in family.samples]
        yield from families.values()

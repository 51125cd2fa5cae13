"""Prometheus instruments, one registry per app (several apps share a test process).

Other parts of the server increment the named instruments directly, e.g.
`services.metrics.adapter_cache_hits.inc()`. Per-adapter series are labelled
(tenant, adapter) through `AdapterLabels`, which caps how many distinct pairs
exist (adapter ids are tenant-chosen: unbounded labels would let one tenant
grow every scrape and the server's memory without limit). State that already
lives elsewhere (KV rows, pins, training jobs, process memory) is read at
scrape time by `LiveCollector` instead of being mirrored into gauges.

Who sees what: an admin (or dev mode, one tenant) scrapes everything; any other
tenant gets `render(tenant=...)`, only the series labelled with its own tenant
plus the gauges in `PUBLIC_GAUGES`, which say nothing about other tenants (not
even how busy the server is): adapter ids and traffic are tenants' secrets. So
`ADMIN_ONLY` series, labelled by tenant but counting what others' traffic did to
it, stay out of a tenant's view.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOAD_BUCKETS = STEP_BUCKETS  # adapter loads span the same milliseconds-to-seconds range
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BASE_LABEL = "_base"  # requests on the base model (no adapter)
OTHER_LABEL = "_other"  # pairs past the cardinality cap
DEFAULT_MAX_ADAPTER_SERIES = 256
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PUBLIC_GAUGES = frozenset({"loraplex_engine_alive", "loraplex_accepting"})  # tenant-free, load-free
# Tenant-labelled, yet caused by other tenants (a preemption says another tenant below its share was busy).
ADMIN_ONLY = frozenset({"loraplex_tenant_preemptions"})


class AdapterLabels:
    """(tenant, adapter) label values, at most `limit` distinct pairs; later pairs share `_other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str, adapter: str) -> tuple[str, str]:
        pair = (tenant, adapter)
        with self._lock:
            if pair in self._seen:
                return pair
            if len(self._seen) < self.limit:
                self._seen.add(pair)
                return pair
        return (OTHER_LABEL, OTHER_LABEL)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_adapter_series: int = DEFAULT_MAX_ADAPTER_SERIES) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.adapter_labels = AdapterLabels(max_adapter_series)
        self.requests = Counter("loraplex_requests", "Generation requests finished",
                                ["route", "finish_reason"], registry=r)
        self.requests_rejected = Counter("loraplex_requests_rejected", "Requests refused before running",
                                         ["reason"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens",
                                     "Prompt tokens prefilled (computed: prefix-cache hits excluded)", registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("loraplex_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("loraplex_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram("loraplex_batch_size", "Sequences per engine step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.step_latency = Histogram("loraplex_step_latency_seconds", "Engine step wall time",
                                      registry=r, buckets=STEP_BUCKETS)
        self.engine_errors = Counter("loraplex_engine_errors", "Engine steps that raised", registry=r)
        self.adapter_cache_hits = Counter("loraplex_adapter_cache_hits", "Adapter found resident",
                                          ["tier"], registry=r)
        self.adapter_cache_misses = Counter("loraplex_adapter_cache_misses", "Adapter had to be loaded",
                                            ["tier"], registry=r)
        self.adapter_cache_evictions = Counter("loraplex_adapter_cache_evictions", "Adapters evicted",
                                               ["tier"], registry=r)
        self.adapter_load_latency = Histogram(
            "loraplex_adapter_load_seconds",
            "Adapter loads by tier: host = read + validate from disk (loader thread); "
            "device = copy into a slot (engine thread, between steps)",
            ["tier"], registry=r, buckets=LOAD_BUCKETS)
        self.adapters_resident = Gauge("loraplex_adapters_resident", "Adapters in device slots", registry=r)
        self.merged_copies = Gauge("loraplex_merged_copies", "Merged (dedicated) copies of the base held",
                                   registry=r)
        self.merged_bytes = Gauge("loraplex_merged_bytes", "Bytes held by merged copies (adapted modules only)",
                                  registry=r)
        self.training_steps = Counter("loraplex_training_steps", "Background training steps run", registry=r)

        self._add_per_adapter(r)
        self._add_per_tenant(r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co. (Linux /proc)

    def _add_per_adapter(self, r: CollectorRegistry) -> None:
        pair = ["tenant", "adapter"]
        self.adapter_requests = Counter("loraplex_adapter_requests", "Generation requests finished, per adapter",
                                        [*pair, "finish_reason"], registry=r)
        self.adapter_prompt_tokens = Counter("loraplex_adapter_prompt_tokens", "Prompt tokens, per adapter",
                                             pair, registry=r)
        self.adapter_prefix_cached_tokens = Counter(
            "loraplex_adapter_prefix_cached_tokens", "Prompt tokens whose KV was reused from the prefix cache, "
            "per adapter (hit rate: divide by loraplex_adapter_prompt_tokens)", pair, registry=r)
        self.adapter_generated_tokens = Counter("loraplex_adapter_generated_tokens", "Tokens generated, per adapter",
                                                pair, registry=r)
        self.adapter_latency = Histogram("loraplex_adapter_request_latency_seconds",
                                         "Submit to last event, per adapter", pair, registry=r,
                                         buckets=LATENCY_BUCKETS)
        self.adapter_ttft = Histogram("loraplex_adapter_time_to_first_token_seconds",
                                      "Submit to first token, per adapter", pair, registry=r, buckets=LATENCY_BUCKETS)

    def _add_per_tenant(self, r: CollectorRegistry) -> None:
        """Tenant labels are bounded by the API-keys file (admins name tenants; clients cannot)."""
        self.tenant_rate_limited = Counter("loraplex_tenant_rate_limited",
                                           "Requests refused with 429 by one of the tenant's limits",
                                           ["tenant", "limit"], registry=r)
        self.tenant_service_tokens = Counter("loraplex_tenant_service_tokens",
                                             "Tokens served per tenant as fair admission counts them "
                                             "(prompt at admission, generated per decode step)",
                                             ["tenant", "phase"], registry=r)
        self.tenant_preemptions = Counter("loraplex_tenant_preemptions",
                                          "Running sequences of the tenant preempted for a tenant below its "
                                          "share (recomputed later)", ["tenant"], registry=r)
        self.tenant_virtual_tokens = Gauge("loraplex_tenant_virtual_tokens",
                                           "Fair-admission counter: weighted service received (least goes first)",
                                           ["tenant"], registry=r)

    def observe_preemption(self, tenant: str) -> None:
        """One of the tenant's running sequences was preempted for a tenant below its share (engine thread)."""
        self.tenant_preemptions.labels(tenant).inc()

    def observe_service(self, tenant: str, prompt_tokens: int, generated_tokens: int, counter: float) -> None:
        """Service charged to a tenant by fair admission (engine thread)."""
        if prompt_tokens:
            self.tenant_service_tokens.labels(tenant, "prompt").inc(prompt_tokens)
        if generated_tokens:
            self.tenant_service_tokens.labels(tenant, "generated").inc(generated_tokens)
        self.tenant_virtual_tokens.labels(tenant).set(counter)

    def observe_generation(self, tenant: str, adapter_id: str | None, finish_reason: str,
                           prompt_tokens: int, completion_tokens: int, seconds: float,
                           first_token_s: float | None, cached_tokens: int = 0) -> None:
        """One finished (or cancelled / failed) generation, under its bounded (tenant, adapter) labels."""
        labels = self.adapter_labels(tenant, BASE_LABEL if adapter_id is None else adapter_id)
        self.adapter_requests.labels(*labels, finish_reason).inc()
        self.adapter_prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.adapter_prefix_cached_tokens.labels(*labels).inc(cached_tokens)
        self.adapter_generated_tokens.labels(*labels).inc(completion_tokens)
        self.adapter_latency.labels(*labels).observe(seconds)
        if first_token_s is not None:
            self.adapter_ttft.labels(*labels).observe(first_token_s)

    def render(self, live: LiveState, tenant: str | None = None) -> bytes:
        """Prometheus text: the instruments plus `live`'s scrape-time gauges (engine, adapter manager,
        training queue); everything (tenant None, for admins) or one tenant's own view."""
        scrape = Scrape(self.registry, LiveCollector(live))
        if tenant is None:
            return generate_latest(scrape)  # type: ignore[arg-type]
        return generate_latest(TenantView(scrape, tenant))  # type: ignore[arg-type]


class NullMetrics(Metrics):
    """The same instruments on a registry nobody scrapes: what a component gets when run without an
    app (tests, benchmarks), so it never checks whether it has metrics."""

    def __init__(self) -> None:
        super().__init__(max_adapter_series=1)


class Collector(Protocol):
    def collect(self) -> Iterator[Metric]: ...


class Scrape:
    """One scrape's families: the registry's instruments, then the live gauges read now."""

    def __init__(self, *sources: Collector) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


class TenantView:
    """The registry as one tenant may see it: its own `tenant`-labelled samples and `PUBLIC_GAUGES`.

    Samples past the cardinality cap (`_other`) mix tenants, so no tenant sees them.
    """

    def __init__(self, registry: Collector, tenant: str) -> None:
        self.registry = registry
        self.tenant = tenant

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.name in PUBLIC_GAUGES:
                yield family
                continue
            if family.name in ADMIN_ONLY:
                continue
            own = [s for s in family.samples if s.labels.get("tenant") == self.tenant]
            if own:
                view = Metric(family.name, family.documentation, family.type, family.unit)
                view.samples = own
                yield view


class EngineState(Protocol):
    """What a scrape reads of the engine (server.engine.engine.Engine)."""

    @property
    def alive(self) -> bool: ...
    def stats(self) -> dict[str, Any]: ...


class AdapterState(Protocol):
    """What a scrape reads of the adapter manager (server.adapters.residency.manager.AdapterManager)."""

    def stats(self) -> dict[str, Any]: ...


class JobCounts(Protocol):
    """The training job table (server.training.jobs.JobStore)."""

    def count(self, status: str) -> int: ...
    def get(self, job_id: str, tenant: str | None, history: bool = True) -> dict[str, Any]: ...


class ActiveJob(Protocol):
    """The training worker (server.training.worker.TrainingWorker)."""

    @property
    def active_job_id(self) -> str | None: ...


class TrainingState(Protocol):
    """What a scrape reads of training (server.training.service.TrainingService)."""

    @property
    def jobs(self) -> JobCounts: ...
    @property
    def worker(self) -> ActiveJob: ...


class LiveState(Protocol):
    """The live state the scrape-time gauges read (server.api.services.Services)."""

    @property
    def engine(self) -> EngineState: ...
    @property
    def adapters(self) -> AdapterState: ...
    @property
    def jobs(self) -> TrainingState: ...
    @property
    def accepting(self) -> bool: ...


class LiveCollector:
    """Scrape-time gauges for state owned by other objects; one failing source never breaks a scrape."""

    def __init__(self, services: LiveState) -> None:
        self.services = services

    def describe(self) -> list[Metric]:
        return []  # contents depend on what is attached; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        for source in (self._engine, self._adapters, self._training):
            try:
                yield from source()
            except Exception:  # noqa: BLE001 - a scrape must not fail because one part is shutting down
                log.debug("metrics source %s failed", source.__name__, exc_info=True)

    def _engine(self) -> Iterator[Metric]:
        engine = self.services.engine
        stats = engine.stats()
        yield _gauge("loraplex_engine_alive", "1 while the engine thread runs", float(bool(engine.alive)))
        yield _gauge("loraplex_kv_rows_free", "KV-cache rows (batch slots) free", stats["free_kv_rows"])
        yield _gauge("loraplex_kv_rows", "KV-cache rows (batch slots) in all", stats["max_batch"])
        yield CounterMetricFamily("loraplex_engine_interrupted_steps", "Steps abandoned between layers for an "
                                  "arriving request that preempts (their work is redone)",
                                  value=float(stats["interrupted_steps"]))
        yield _gauge("loraplex_accepting", "0 while draining (SIGTERM)", float(bool(self.services.accepting)))

    def _adapters(self) -> Iterator[Metric]:
        stats = self.services.adapters.stats()
        yield _gauge("loraplex_adapter_pins", "Adapter device-slot pins held by requests", stats.get("pinned", 0))
        yield _gauge("loraplex_adapters_host", "Adapters in the host-memory tier", stats.get("host_entries", 0))
        yield _gauge("loraplex_adapters_loading", "Adapter loads in progress", stats.get("loading", 0))

    def _training(self) -> Iterator[Metric]:
        training = self.services.jobs
        jobs = GaugeMetricFamily("loraplex_training_jobs", "Training jobs by status", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], training.jobs.count(status))
        yield jobs
        active = training.worker.active_job_id
        step = steps = 0
        if active is not None:
            progress = training.jobs.get(active, None, history=False)["progress"]
            step, steps = progress["step"], progress["steps"]
        yield _gauge("loraplex_training_active_step", "Optimizer step of the running job (0: none)", step)
        yield _gauge("loraplex_training_active_steps", "Total steps of the running job (0: none)", steps)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))

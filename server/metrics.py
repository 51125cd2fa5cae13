"""Prometheus instruments, one registry per app (several apps share a test process).

Other parts of the server increment the named instruments directly, e.g.
`services.metrics.adapter_cache_hits.inc()`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("loraplex_requests", "Generation requests finished",
                                ["route", "finish_reason"], registry=r)
        self.requests_rejected = Counter("loraplex_requests_rejected", "Requests refused before running",
                                         ["reason"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens prefilled", registry=r)
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
        self.adapters_resident = Gauge("loraplex_adapters_resident", "Adapters in device slots", registry=r)
        self.training_steps = Counter("loraplex_training_steps", "Background training steps run", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""bench.scale_out reads the metric it names and writes adapters the server's reader accepts."""

from __future__ import annotations

from prometheus_client import generate_latest

from server.adapters.peft.peft_config import summary_from_config
from server.adapters.store.store import AdapterStore
from server.metrics import Metrics

from bench.scale_out import MISSES_RE, write_adapters


def test_the_cold_load_pattern_matches_the_servers_metric():
    metrics = Metrics(max_adapter_series=4)
    metrics.adapter_cache_misses.labels(tier="host").inc(3)
    metrics.adapter_cache_misses.labels(tier="device").inc(5)
    text = generate_latest(metrics.registry).decode()
    assert [float(v) for v in MISSES_RE.findall(text)] == [3.0]


def test_the_adapters_are_listed_with_their_rank(tmp_path):
    ids = write_adapters(tmp_path, 2, rank=4)
    store = AdapterStore(tmp_path)
    assert store.adapter_ids("default") == ids
    assert summary_from_config(store.resolve("default", ids[0]).path / "adapter_config.json")["rank"] == 4

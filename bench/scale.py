"""Scenario 4: scale — 1,000 registered adapters behind 64 device slots.

Why its own server and store: the slot count and host-tier size differ from
the other scenarios, and 1,000 adapter directories would slow every other
server's start-up scan. The store holds the 16 adapters of scenario 1 under
their own ids (the reference load, measured side by side on this server) and
the 1,000 scale ids, all hard links to a few distinct weight files.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from bench.adapters import AdapterSpec, link_adapters
from bench.config import BenchConfig
from bench.context import Bench, median, ratio
from bench.process import ServerHandle, spawn
from bench.report import Row
from bench.workload import assign, distinct_adapters, drawn

SCALE_TARGET = 0.8
HOST_MEM_TARGET = 1.1
DISTRIBUTIONS = ("uniform", "zipf")


def reference_count(ctx: Bench) -> int:
    """Scenario 1's 16-adapter load (the largest count ≤ 16 a quick run has)."""
    return max(n for n in ctx.cfg.adapter_counts if n <= 16) if any(
        n <= 16 for n in ctx.cfg.adapter_counts) else min(ctx.cfg.adapter_counts)


def probe_count(cfg: BenchConfig) -> int:
    """Adapters loaded by the host-memory probe: they fit the host tier with room to spare."""
    return max(1, min(32, cfg.scale_host // 2, cfg.scale_registered))


def build_store(ctx: Bench, store: Path) -> tuple[list[AdapterSpec], list[AdapterSpec]]:
    cfg = ctx.cfg
    n_ref = reference_count(ctx)
    ref = link_adapters(ctx.lora[:n_ref], [s.adapter_id for s in ctx.lora[:n_ref]], store)
    sources = ctx.lora[:cfg.scale_distinct_files]
    n_probe = probe_count(cfg)
    ids = [f"scale-{i:04d}" for i in range(cfg.scale_registered)]
    scale = link_adapters(sources, ids[:-n_probe], store)
    # The memory probe's adapters get their own file copies: a tensor the server keeps backed by a
    # file mapping would be shared between hard links and under-counted.
    scale += link_adapters(sources, ids[-n_probe:], store, copy=True)
    note = (f"scenario 4: {cfg.scale_registered} adapter ids registered, {cfg.scale_registered - n_probe} of them "
            f"hard links to {len(sources)} distinct PEFT weight files (disk use) and {n_probe} (the memory "
            f"probe's) plain copies; the server loads, validates and caches each id as its own adapter")
    ctx.notes.append(note)
    ctx.log(note)
    return ref, scale


def scenario4(ctx: Bench) -> None:
    cfg = ctx.cfg
    store = ctx.work / "store-scale"
    ref, scale = build_store(ctx, store)
    # No start-up prefetch here: this scenario measures loads under churn (each id's first request
    # reads its files) and the memory probe must see its adapters load after the baseline reading.
    env = {"LORAPLEX_MAX_ADAPTERS_HOST": str(cfg.scale_host), "LORAPLEX_PREFETCH_ADAPTERS": "false"}
    ctx.log(f"scenario 4: server with {cfg.scale_slots} device slots, host tier {cfg.scale_host} adapters")
    with spawn(ctx.cfg, store, ctx.work / "server-scale.log", max_batch=cfg.concurrency,
               resident=cfg.scale_slots, env=env) as h:
        ref_ids: list[str | None] = [s.adapter_id for s in ref]
        # One adapter first (allocates the slot banks), then the memory probe before anything has
        # been evicted, so freed buffers the allocator could hand back do not hide new growth.
        ctx.warm_up(h, ref_ids[:1], "s4 warm-up (1 adapter)")
        memory = host_memory(ctx, h, scale)
        ctx.warm_up(h, ref_ids)
        rounds = []
        for rnd in range(cfg.repeats):
            ctx.warm_up(h, ref_ids, f"s4 r{rnd} reference warm-up")  # scale runs may have evicted them
            row = {"reference": ctx.measure(h, assign(ref_ids, cfg.requests_per_run, cfg.new_tokens),
                                            f"s4 r{rnd} reference x{len(ref_ids)}")}
            for i, dist in enumerate(DISTRIBUTIONS):
                reqs = drawn([s.adapter_id for s in scale], cfg.scale_requests, cfg.new_tokens, dist,
                             seed=cfg.seed * 1000 + rnd * 10 + i)
                row[dist] = ctx.measure(h, reqs, f"s4 r{rnd} {dist} ({distinct_adapters(reqs)} distinct)")
            rounds.append(row)
        metrics_text = _metrics(h)
    _rows(ctx, rounds, memory, len(ref))
    ctx.data["s4"] = {"registered": cfg.scale_registered, "slots": cfg.scale_slots, "host_tier": cfg.scale_host,
                      "distinct_weight_files": cfg.scale_distinct_files,
                      "rounds": [{k: v.summary() for k, v in r.items()} for r in rounds],
                      "host_memory": memory, "cache_metrics": _cache_lines(metrics_text)}


def _rows(ctx: Bench, rounds: list[dict], memory: dict, n_ref: int) -> None:
    ref_abs = median([r["reference"].throughput for r in rounds])
    for dist in DISTRIBUTIONS:
        value = median([ratio(r[dist].throughput, r["reference"].throughput) for r in rounds])
        abs_ = median([r[dist].throughput for r in rounds])
        # Where a whole-run loss comes from: the batch's per-step cost (decode rate) or its start,
        # where every request of the wave may wait on a cold adapter (disk read + validation).
        decode = median([ratio(r[dist].decode_throughput, r["reference"].decode_throughput) for r in rounds])
        ttft, ref_ttft = (median([r[k].summary()["ttft_p50_ms"] for r in rounds]) for k in (dist, "reference"))
        ctx.rows.append(Row(4, f"throughput, {ctx.cfg.scale_registered} adapters {dist} / {n_ref} adapters",
                            value, target=SCALE_TARGET,
                            info=f"{abs_:.0f} vs {ref_abs:.0f} tok/s, {ctx.cfg.scale_slots} slots; decode rate "
                                 f"{decode:.2f}x, TTFT p50 {ttft / 1000:.2f} vs {ref_ttft / 1000:.2f} s"))
    ctx.rows.append(Row(4, "host memory per adapter / its tensor bytes", memory.get("ratio"),
                        target=HOST_MEM_TARGET, op="<=", info=memory.get("how", "")))


# --- host memory ----------------------------------------------------------------------------

HOST_BYTES_RE = re.compile(r"^(loraplex_\w*host\w*bytes\w*)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)
HOST_COUNT_RE = re.compile(r"^(loraplex_adapters?_host\w*)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$", re.M)


def _metrics(h: ServerHandle) -> str:
    try:
        return httpx.get(f"{h.base_url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return ""


def _cache_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "adapter" in ln and not ln.startswith("#")][:40]


def host_memory(ctx: Bench, h: ServerHandle, scale: list[AdapterSpec]) -> dict:
    """Host bytes per loaded adapter vs its tensor bytes.

    Preferred source: a host-tier byte gauge on the server's /metrics. When
    the server exposes none: the server process's resident-memory growth
    (anonymous + file-backed) over loading K fresh adapters one at a time,
    divided by K. That includes allocator slack and anything else a load
    allocates; on a CPU device the slots are host memory too, but they are
    preallocated before the probe (one adapter is loaded first), so loading
    only writes into them.
    """
    k = probe_count(ctx.cfg)
    fresh = scale[-k:]
    tensor_bytes = fresh[0].tensor_bytes
    mem0, before = h.memory(), _host_gauges(_metrics(h))
    ctx.measure(h, assign([s.adapter_id for s in fresh], k, 1), f"s4 host-memory probe ({k} fresh adapters)",
                concurrency=1)  # one at a time: no two loads' temporaries alive together
    mem1, after = h.memory(), _host_gauges(_metrics(h))
    growth = {key: (mem1.get(key, 0) - mem0.get(key, 0)) / k for key in ("rss", "anon", "file")}
    rss_how = (f"RSS growth {growth['rss'] / 2**20:.1f} MiB/adapter (anon {growth['anon'] / 2**20:.1f}, "
               f"file-backed {growth['file'] / 2**20:.1f})")
    out: dict = {"k": k, "tensor_bytes": tensor_bytes, "memory_before": mem0, "memory_after": mem1,
                 "growth_per_adapter": growth, "metrics_before": before, "metrics_after": after}
    if after.get("bytes") and after.get("count"):
        per = after["bytes"] / after["count"]
        out.update(per_adapter=per, ratio=per / tensor_bytes, source=f"/metrics {after['bytes_name']}",
                   how=f"{per / 2**20:.1f} MiB per adapter ({after['bytes_name']} / {after['count_name']}) vs "
                       f"{tensor_bytes / 2**20:.1f} MiB tensors; {rss_how}")
    elif mem0.get("rss") and growth["rss"] <= 0:
        out.update(ratio=None, source="rss", how=f"server RSS did not grow over {k} loads (allocator reuse); "
                   "no measurement")
    elif mem0.get("rss"):
        per = growth["rss"]
        out.update(per_adapter=per, ratio=per / tensor_bytes, source="rss",
                   how=f"server {rss_how} over {k} fresh adapters vs {tensor_bytes / 2**20:.1f} MiB tensors "
                       "(measured by the OS, not self-reported by the server)")
    else:
        out.update(ratio=None, source="none", how="no /metrics gauge and no /proc on this OS")
    return out


def _host_gauges(text: str) -> dict:
    out: dict = {}
    for name, value in HOST_BYTES_RE.findall(text):
        out["bytes_name"], out["bytes"] = name, out.get("bytes", 0.0) + float(value)
    for name, value in HOST_COUNT_RE.findall(text):
        out["count_name"], out["count"] = name, out.get("count", 0.0) + float(value)
    return out

"""Scenario 3: hot loading — what a never-seen adapter costs its own request and everyone else's.

Two kinds of "not resident" (not in a device slot): in host memory (the
server's start-up prefetch, or an upload, put it there: a request pays a slot
copy) and on disk only (placed in the store after start-up: a request pays the
read and validation too). Two measurements. (1) Idle server: time to first
token for such an adapter's first request minus the same request right after,
now resident; paired per adapter, median reported, for each kind. (2) Under
load: background streams on resident adapters decode continuously while probe
requests for on-disk adapters arrive at a fixed interval; the background's
inter-token gaps (≈ the engine's step latency) are compared between a phase
whose probes use resident adapters and one whose probes load from disk. Same
prompts and timing in both phases, so the only difference is the loading.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.adapters import AdapterSpec, link_adapters
from bench.context import Bench, median, ratio
from bench.load import GenRequest, GenResult, LoadRun, client_for, percentile, stream_one
from bench.process import ServerHandle
from bench.report import Row
from bench.workload import PROMPTS

EXTRA_TTFT_TARGET_MS = 50.0
STEP_P99_TARGET = 1.2
PROBE_TOKENS = 4


@dataclass
class Phase:
    background: LoadRun
    probes: list[GenResult]
    t_from: float
    t_to: float

    def gaps(self) -> list[float]:
        return self.background.gaps(self.t_from, self.t_to)


async def _sequential(base_url: str, reqs: Sequence[GenRequest], timeout_s: float) -> list[GenResult]:
    async with client_for(base_url, 1, timeout_s) as client:
        return [await stream_one(client, r) for r in reqs]


async def _phase(ctx: Bench, base_url: str, bg_adapters: Sequence[str], probes: Sequence[GenRequest]) -> Phase:
    cfg = ctx.cfg
    stop = asyncio.Event()
    async with client_for(base_url, cfg.background_streams + len(probes), cfg.run_timeout_s) as client:
        async def worker(i: int) -> list[GenResult]:
            out: list[GenResult] = []
            while not stop.is_set():
                req = GenRequest(PROMPTS[i % len(PROMPTS)], bg_adapters[i % len(bg_adapters)], cfg.new_tokens)
                out.append(await stream_one(client, req))
            return out

        t_start = time.perf_counter()
        workers = [asyncio.ensure_future(worker(i)) for i in range(cfg.background_streams)]
        await asyncio.sleep(2.0)  # let the batch fill and settle
        t_from = time.perf_counter()
        tasks = []
        interval = cfg.probe_window_s / max(1, len(probes))
        for req in probes:
            tasks.append(asyncio.ensure_future(stream_one(client, req)))
            await asyncio.sleep(interval)
        probe_results = list(await asyncio.gather(*tasks))
        t_to = time.perf_counter()
        stop.set()
        bg = [r for rs in await asyncio.gather(*workers) for r in rs]
    return Phase(LoadRun(bg, t_start, time.perf_counter()), probe_results, t_from, t_to)


def scenario3(ctx: Bench, h: ServerHandle) -> None:
    cfg = ctx.cfg
    k = cfg.cold_probes
    host_cold = ctx.cold[:k]
    disk = place_on_disk(ctx, 2 * k)  # after start-up: never prefetched
    idle_disk, load_disk = disk[:k], disk[k:]
    resident = [s.adapter_id for s in ctx.lora[:max(1, min(len(ctx.lora), cfg.background_streams))]]
    ctx.log(f"scenario 3: idle TTFT for {k} adapters in host memory and {k} on disk only; then "
            f"{cfg.background_streams} background streams with {k} probes over {cfg.probe_window_s:.0f} s "
            "(resident vs read from disk)")
    ctx.warm_up(h, list(resident))
    idle = {name: _idle_pairs(ctx, h, specs) for name, specs in (("host", host_cold), ("disk", idle_disk))}
    prompt = PROMPTS[7]
    warm_probes = [GenRequest(prompt, resident[i % len(resident)], PROBE_TOKENS) for i in range(k)]
    cold_probes = [GenRequest(prompt, s.adapter_id, PROBE_TOKENS) for s in load_disk]
    with_resident = asyncio.run(_phase(ctx, h.base_url, resident, warm_probes))
    with_loads = asyncio.run(_phase(ctx, h.base_url, resident, cold_probes))
    for name, ph in (("s3 resident phase", with_resident), ("s3 loading phase", with_loads)):
        ctx.record_failures(name, ph.background)
        _record(ctx, name + " probes", ph.probes)
    _rows(ctx, idle, with_resident, with_loads)


def place_on_disk(ctx: Bench, n: int) -> list[AdapterSpec]:
    """Copies of the cold adapters' files under new ids, written into the running server's store."""
    ids = [f"disk-{i:03d}" for i in range(n)]
    return link_adapters(ctx.cold or ctx.lora, ids, ctx.store, copy=True)


def _idle_pairs(ctx: Bench, h: ServerHandle, specs: Sequence[AdapterSpec]) -> dict[str, list[float]]:
    """TTFT (ms) of each adapter's first request (not resident) and of the same request again (resident)."""
    reqs: list[GenRequest] = []
    for spec in specs:
        reqs += [GenRequest(PROMPTS[7], spec.adapter_id, PROBE_TOKENS)] * 2
    results = asyncio.run(_sequential(h.base_url, reqs, ctx.cfg.run_timeout_s))
    _record(ctx, "s3 idle probes", results)
    return {"cold": [r.ttft_s * 1000 for r in results[0::2]], "warm": [r.ttft_s * 1000 for r in results[1::2]]}


def _record(ctx: Bench, label: str, results: list[GenResult]) -> None:
    ctx.record_failures(label, LoadRun(results, 0.0, 0.0))


def _extra(pairs: dict[str, list[float]]) -> float:
    return median([c - w for c, w in zip(pairs["cold"], pairs["warm"])])


def _rows(ctx: Bench, idle: dict[str, dict[str, list[float]]], res: Phase, load: Phase) -> None:
    p99_res, p99_load = percentile(res.gaps(), 99) * 1000, percentile(load.gaps(), 99) * 1000
    p50_res, p50_load = percentile(res.gaps(), 50) * 1000, percentile(load.gaps(), 50) * 1000
    ttft_under = {name: median([r.ttft_s * 1000 for r in ph.probes if r.ok])
                  for name, ph in (("resident", res), ("disk", load))}
    for tier, what in (("host", "in host memory (prefetched)"), ("disk", "on disk only (host-tier miss)")):
        pairs = idle[tier]
        ctx.rows.append(Row(3, f"extra TTFT, adapter {what} vs resident (idle server)", _extra(pairs), unit="ms",
                            target=EXTRA_TTFT_TARGET_MS, op="<=",
                            info=f"TTFT median {median(pairs['cold']):.0f} ms first request vs "
                                 f"{median(pairs['warm']):.0f} ms resident"))
    ctx.rows.append(Row(3, "background step (ITL) p99 while adapters load from disk / without",
                        ratio(p99_load, p99_res), target=STEP_P99_TARGET, op="<=",
                        info=f"p99 {p99_load:.0f} vs {p99_res:.0f} ms, p50 {p50_load:.0f} vs {p50_res:.0f} ms; "
                             f"{len(load.gaps())}/{len(res.gaps())} gaps; probe TTFT under load "
                             f"{ttft_under['disk']:.0f} (disk) vs {ttft_under['resident']:.0f} ms (resident)"))
    ctx.data["s3"] = {
        "idle_ttft_ms": idle, "extra_ttft_ms": {tier: _extra(pairs) for tier, pairs in idle.items()},
        "under_load_ttft_ms": ttft_under,
        "itl_ms": {"resident": {"p50": p50_res, "p99": p99_res, "n": len(res.gaps())},
                   "loading": {"p50": p50_load, "p99": p99_load, "n": len(load.gaps())}},
        "gaps_ms": {"resident": [round(g * 1000, 2) for g in res.gaps()],
                    "loading": [round(g * 1000, 2) for g in load.gaps()]},
        "probe_times_s": {"resident": [round(r.t_send - res.t_from, 3) for r in res.probes],
                          "loading": [round(r.t_send - load.t_from, 3) for r in load.probes]},
    }

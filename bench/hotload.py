"""Scenario 3: hot loading — what a never-seen adapter costs its own request and everyone else's.

Two measurements. (1) Idle server: time to first token for an adapter that is
not resident (first request ever: read from disk, validated, copied into a
slot) minus the same request right after, now resident; paired per adapter,
median reported. (2) Under load: background streams on resident adapters
decode continuously while probe requests arrive at a fixed interval; the
background's inter-token gaps (≈ the engine's step latency) are compared
between a phase whose probes use resident adapters and one whose probes use
cold adapters. Same prompts and timing in both phases, so the only difference
is the loading.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

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
    idle_cold, load_cold = ctx.cold[:k], ctx.cold[k:2 * k]
    resident = [s.adapter_id for s in ctx.lora[:max(1, min(len(ctx.lora), cfg.background_streams))]]
    ctx.log(f"scenario 3: idle TTFT for {k} cold adapters; then {cfg.background_streams} background streams "
            f"with {k} probes over {cfg.probe_window_s:.0f} s (resident vs cold)")
    ctx.warm_up(h, list(resident))
    prompt = PROMPTS[7]
    idle_reqs: list[GenRequest] = []
    for spec in idle_cold:  # cold, then the same again (now resident)
        idle_reqs += [GenRequest(prompt, spec.adapter_id, PROBE_TOKENS)] * 2
    idle = asyncio.run(_sequential(h.base_url, idle_reqs, cfg.run_timeout_s))
    _record(ctx, "s3 idle probes", idle)
    cold_ttft = [r.ttft_s * 1000 for r in idle[0::2]]
    warm_ttft = [r.ttft_s * 1000 for r in idle[1::2]]
    extra = median([c - w for c, w in zip(cold_ttft, warm_ttft)])

    warm_probes = [GenRequest(prompt, resident[i % len(resident)], PROBE_TOKENS) for i in range(k)]
    cold_probes = [GenRequest(prompt, s.adapter_id, PROBE_TOKENS) for s in load_cold]
    with_resident = asyncio.run(_phase(ctx, h.base_url, resident, warm_probes))
    with_loads = asyncio.run(_phase(ctx, h.base_url, resident, cold_probes))
    for name, ph in (("s3 resident phase", with_resident), ("s3 loading phase", with_loads)):
        ctx.record_failures(name, ph.background)
        _record(ctx, name + " probes", ph.probes)
    _rows(ctx, extra, cold_ttft, warm_ttft, with_resident, with_loads)


def _record(ctx: Bench, label: str, results: list[GenResult]) -> None:
    ctx.record_failures(label, LoadRun(results, 0.0, 0.0))


def _rows(ctx: Bench, extra: float, cold: list[float], warm: list[float], res: Phase, load: Phase) -> None:
    p99_res, p99_load = percentile(res.gaps(), 99) * 1000, percentile(load.gaps(), 99) * 1000
    p50_res, p50_load = percentile(res.gaps(), 50) * 1000, percentile(load.gaps(), 50) * 1000
    ttft_under = {name: median([r.ttft_s * 1000 for r in ph.probes if r.ok])
                  for name, ph in (("resident", res), ("cold", load))}
    ctx.rows.append(Row(3, "extra TTFT, non-resident vs resident adapter (idle server)", extra, unit="ms",
                        target=EXTRA_TTFT_TARGET_MS, op="<=",
                        info=f"TTFT median {median(cold):.0f} ms cold vs {median(warm):.0f} ms resident; "
                             f"under load {ttft_under['cold']:.0f} vs {ttft_under['resident']:.0f} ms"))
    ctx.rows.append(Row(3, "background step (ITL) p99 while adapters load / without", ratio(p99_load, p99_res),
                        target=STEP_P99_TARGET, op="<=",
                        info=f"p99 {p99_load:.0f} vs {p99_res:.0f} ms, p50 {p50_load:.0f} vs {p50_res:.0f} ms; "
                             f"{len(load.gaps())}/{len(res.gaps())} gaps"))
    ctx.data["s3"] = {
        "idle_ttft_cold_ms": cold, "idle_ttft_resident_ms": warm, "extra_ttft_ms": extra,
        "under_load_ttft_ms": ttft_under,
        "itl_ms": {"resident": {"p50": p50_res, "p99": p99_res, "n": len(res.gaps())},
                   "loading": {"p50": p50_load, "p99": p99_load, "n": len(load.gaps())}},
        "gaps_ms": {"resident": [round(g * 1000, 2) for g in res.gaps()],
                    "loading": [round(g * 1000, 2) for g in load.gaps()]},
        "probe_times_s": {"resident": [round(r.t_send - res.t_from, 3) for r in res.probes],
                          "loading": [round(r.t_send - load.t_from, 3) for r in load.probes]},
    }

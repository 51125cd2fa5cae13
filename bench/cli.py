"""`python -m bench [--quick] [--model PATH] [--scenarios 1,2,3,4,5] ...`: run, print, write.

Order of work: adapters and PEFT baselines first (no server running), then the
main server (scenarios 1, 2, 3, 5), then the scale server (scenario 4), then
the table, JSON and plots. Exit status 0 when the run completed with no failed
request (targets missed are reported, not errors); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import plots, step_ops
from bench.config import ALL_SCENARIOS, BenchConfig
from bench.context import Bench
from bench.hotload import scenario3
from bench.model import load_bench_model, server_settings
from bench.prepare import make_all_adapters, make_references
from bench.process import spawn
from bench.report import clean_nans, machine_info, text_table, write_results
from bench.scale import scenario4
from bench.scenarios import (scenario1, scenario1_defaults, scenario1_half_slots, scenario2, scenario5,
                             wait_for_prefetch)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 minute run: every scenario, far less data")
    p.add_argument("--model", help="local HF model dir or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--scenarios", default=",".join(map(str, ALL_SCENARIOS)), help="comma list, e.g. 1,2")
    p.add_argument("--concurrency", type=int, help="concurrent streams (default 32; quick 8)")
    p.add_argument("--new-tokens", type=int, help="max_new_tokens per request (default 64; quick 16)")
    p.add_argument("--repeats", type=int, help="interleaved rounds of scenarios 2-4 (default 2; quick 1)")
    p.add_argument("--s1-repeats", type=int, help="interleaved rounds of scenario 1 (default 3; quick 1)")
    p.add_argument("--s5-repeats", type=int, help="interleaved rounds of scenario 5 (default 3; quick 1)")
    p.add_argument("--threads", type=int, help="torch threads for the server and PEFT alike "
                   "(default on CPU: cores - 1, leaving one core to the load generator; on GPU: torch's)")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    scenarios = tuple(sorted({int(s) for s in a.scenarios.split(",") if s.strip()}))
    if not scenarios or any(s not in ALL_SCENARIOS for s in scenarios):
        p.error(f"--scenarios must be a comma list of {ALL_SCENARIOS}")
    kw: dict[str, Any] = {"out": a.out, "model": a.model, "device": a.device, "dtype": a.dtype,
                          "scenarios": scenarios}
    for key, val in (("concurrency", a.concurrency), ("new_tokens", a.new_tokens), ("repeats", a.repeats),
                     ("s1_repeats", a.s1_repeats), ("s5_repeats", a.s5_repeats), ("threads", a.threads)):
        if val is not None:
            if val < 1:
                p.error(f"--{key.replace('_', '-')} must be >= 1")
            kw[key] = val
    return BenchConfig.quick_defaults(**kw) if a.quick else BenchConfig(**kw)


def run(cfg: BenchConfig) -> int:
    t0 = time.perf_counter()
    if cfg.threads is None and server_settings(cfg).torch_device.type == "cpu":
        cfg.threads = max(1, (os.cpu_count() or 2) - 1)
    if cfg.threads:
        # Same thread count on both sides, and one core left to the load generator: an
        # oversubscribed OpenMP pool (more threads than free cores) makes a step up to 10x slower
        # at random moments on a busy machine, which would make any comparison meaningless.
        torch.set_num_threads(cfg.threads)
        cfg.extra_server_env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
    ok = False
    try:
        ctx = Bench(cfg, load_bench_model(cfg), work, work / "store")
        ctx.data["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
        ctx.log(f"model {ctx.bm.model_id} on {ctx.bm.device}/{ctx.bm.dtype}, {torch.get_num_threads()} threads; "
                f"load average {ctx.data['loadavg_1m_at_start']}; work dir {work}")
        make_all_adapters(ctx)
        if 1 in cfg.scenarios:
            _step_ops(ctx)
        if 2 in cfg.scenarios:
            make_references(ctx)
        if set(cfg.scenarios) & {1, 2, 3, 5}:
            _main_server(ctx)
        if 4 in cfg.scenarios:
            scenario4(ctx)
        code = _finish(ctx, time.perf_counter() - t0)
        ok = code == 0
        return code
    finally:
        if not ok:  # keep the server logs of a failed run next to its results
            for log in work.glob("*.log"):
                (cfg.out / "logs").mkdir(parents=True, exist_ok=True)
                shutil.copy(log, cfg.out / "logs" / log.name)
        shutil.rmtree(work, ignore_errors=True)


def _step_ops(ctx: Bench) -> None:
    """Ops per decode step (bench/step_ops.py), in process, before any server runs."""
    settings = server_settings(ctx.cfg)
    ctx.log("counting ops per decode step (torch.profiler)")
    rows, data = step_ops.report_rows(settings.torch_device.type, str(settings.torch_dtype).replace("torch.", ""))
    ctx.rows.extend(rows)
    ctx.data["s1_step_ops"] = data


def _main_server(ctx: Bench) -> None:
    cfg = ctx.cfg
    ctx.log(f"starting the server: max-batch {cfg.concurrency}, {cfg.max_adapters_needed} device slots")
    with spawn(cfg, ctx.store, ctx.work / "server-main.log", max_batch=cfg.concurrency,
               resident=cfg.max_adapters_needed) as h:
        wait_for_prefetch(ctx, h)
        for n, fn in ((1, scenario1), (2, scenario2), (3, scenario3), (5, scenario5)):
            if n in cfg.scenarios:
                fn(ctx, h)
        if h.proc.poll() is not None:
            ctx.failures.append({"run": "main server", "error": f"server exited with {h.proc.returncode}"})
    if 1 in cfg.scenarios:
        scenario1_half_slots(ctx)
        scenario1_defaults(ctx)


def _finish(ctx: Bench, elapsed: float) -> int:
    cfg = ctx.cfg
    ctx.rows.sort(key=lambda r: r.scenario)
    matches = sum(c.match for c in ctx.checks)
    ctx.notes.append(f"output checks (greedy text, loraplex vs PEFT / transformers / unmerged): "
                     f"{matches}/{len(ctx.checks)} identical")
    ctx.notes.append(f"failed requests: {len(ctx.failures)}; wall time {elapsed:.0f} s")
    payload = clean_nans({
        "machine": {**machine_info(str(ctx.bm.device), str(ctx.bm.dtype).replace("torch.", ""), ctx.bm.model_id),
                    "loadavg_1m_at_start": ctx.data.get("loadavg_1m_at_start")},
        "config": {k: v for k, v in vars(cfg).items() if k != "extra_server_env"},
        "scenarios": {k: v for k, v in ctx.data.items() if k.startswith("s")},
        "adapters": ctx.data.get("adapters"),
        "checks": [c.as_dict() for c in ctx.checks],
        "failures": ctx.failures,
        "elapsed_s": round(elapsed, 1),
    })
    json_path, md_path = write_results(cfg.out, payload, ctx.rows, ctx.notes)
    pngs = plots.draw_all(json.loads(json_path.read_text()), cfg.out)
    print("\n" + text_table(ctx.rows))
    for note in ctx.notes:
        print(f"- {note}")
    print(f"\nwrote {json_path}, {md_path}, " + ", ".join(str(p) for p in pngs))
    return 0 if not ctx.failures else 1


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))

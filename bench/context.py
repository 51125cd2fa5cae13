"""What the scenarios share: config, adapters on disk, PEFT results, and everything measured.

Why one object: scenarios run in a fixed order on two server processes, and
some results feed others (PEFT's reference texts are checked against the
server's; scenario 4 compares with the 16-adapter load). Collecting rows,
per-scenario data and every failed request here keeps the report honest: a
failure anywhere shows up in the JSON, never silently dropped.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.adapters import AdapterSpec
from bench.config import BenchConfig
from bench.load import GenRequest, LoadRun, run_load
from bench.model import BenchModel
from bench.process import ServerHandle
from bench.report import Row
from bench.workload import assign


@dataclass
class Check:
    """One output-correctness comparison (loraplex vs a reference)."""

    name: str
    adapter_id: str | None
    prompt: str
    loraplex: str
    reference: str

    @property
    def match(self) -> bool:
        return self.loraplex == self.reference

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "adapter_id": self.adapter_id, "prompt": self.prompt,
                "loraplex": self.loraplex, "reference": self.reference, "match": self.match}


@dataclass
class Bench:
    cfg: BenchConfig
    bm: BenchModel
    work: Path  # temp dir: stores, server logs
    store: Path  # the main server's store
    lora: list[AdapterSpec] = field(default_factory=list)
    miss: list[AdapterSpec] = field(default_factory=list)
    cold: list[AdapterSpec] = field(default_factory=list)  # never requested before scenario 3
    references: list[tuple[str, GenRequest, str]] = field(default_factory=list)  # (name, request, PEFT text)
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", flush=True)

    def measure(self, h: ServerHandle, requests: list[GenRequest], label: str,
                concurrency: int | None = None) -> LoadRun:
        """One bounded load run; failed requests are recorded under `label`."""
        run = run_load(h.base_url, requests, concurrency or self.cfg.concurrency, self.cfg.run_timeout_s)
        self.record_failures(label, run)
        s = run.summary()
        self.log(f"  {label}: {s['tok_per_s']} tok/s, ITL p50 {s['itl_p50_ms']} ms p99 {s['itl_p99_ms']} ms, "
                 f"{s['tokens']} tokens in {s['wall_s']} s, {s['failed']} failed")
        return run

    def warm_up(self, h: ServerHandle, adapters: list[str | None], label: str = "warm-up") -> None:
        """Touch every adapter once (loads it into a device slot) and warm the engine's kernels."""
        ids = list(dict.fromkeys([None, *adapters]))
        self.measure(h, assign(ids, max(len(ids), self.cfg.concurrency), 4), label)

    def record_failures(self, label: str, run: LoadRun) -> None:
        for r in run.failed:
            self.failures.append({"run": label, "adapter_id": r.request.adapter_id, "status": r.status,
                                  "error": r.error[:300]})


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")

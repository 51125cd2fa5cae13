"""Results: the table of ratios with targets, the JSON file, and the machine they were measured on.

Why ratios first: two runs on a shared, noisy machine can differ by 20 % in
absolute tokens/s, but a ratio of two loads measured side by side in the same
run is stable. Absolute numbers are kept (and printed) as information only.
A missing or NaN figure is reported as such and never counts as a PASS.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch


@dataclass
class Row:
    scenario: int
    metric: str
    value: float | None  # the ratio (or the measured figure the target is about)
    unit: str = "x"  # "x" for ratios, "ms" for latencies
    target: float | None = None
    op: Literal[">=", "<="] = ">="
    info: str = ""  # absolute numbers, how it was measured
    available: bool = True  # False: the feature measured does not exist (yet) on this server

    @property
    def verdict(self) -> str:
        if not self.available:
            return "not available"
        if self.target is None:
            return ""
        if self.value is None or math.isnan(self.value):
            return "MISS (no data)"
        ok = self.value >= self.target if self.op == ">=" else self.value <= self.target
        return "PASS" if ok else "MISS"

    def cells(self) -> list[str]:
        target = f"{self.op} {_fmt(self.target, self.unit)}" if self.target is not None else ""
        return [str(self.scenario), self.metric, _fmt(self.value, self.unit), target, self.verdict, self.info]


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"
    return f"{value:.1f} {unit}"


HEADER = ["#", "metric", "measured", "target", "result", "absolute / how"]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |")
    return "\n".join(lines)


def text_table(rows: list[Row]) -> str:
    """Fixed-width table for the terminal."""
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER) - 1)]
    out = []
    for c in cells:
        out.append("  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1])
    return "\n".join(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str, dtype: str, model_id: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "dtype": dtype,
        "model": model_id,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_line(m: dict[str, Any]) -> str:
    dev = m.get("gpu") or m["device"]
    return (f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m.get('memory_gib')} GiB), "
            f"device {dev}, {m['dtype']}, torch {m['torch']} ({m.get('torch_threads')} threads), model {m['model']}; "
            f"load average {m.get('loadavg_1m_at_start')} at start, {m.get('loadavg_1m_at_end')} at end "
            f"(shared machine: absolute numbers are noisy, the ratios are measured side by side).")


def write_results(out: Path, payload: dict[str, Any], rows: list[Row], notes: list[str]) -> tuple[Path, Path]:
    """results.json (everything) and RESULTS.md (the table for the README)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = clean_nans({**payload, "table": [asdict(r) | {"verdict": r.verdict} for r in rows], "notes": notes})
    json_path = out / "results.json"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=False))
    md = [f"### Benchmark results{' (--quick)' if payload['config'].get('quick') else ''}", "",
          machine_line(payload["machine"]), "", markdown_table(rows), ""]
    md += [f"- {n}" for n in notes]
    md_path = out / "RESULTS.md"
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def clean_nans(o: Any) -> Any:
    """JSON has no NaN: turn them into null (a missing figure, never a made-up one)."""
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: clean_nans(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_nans(v) for v in o]
    return o

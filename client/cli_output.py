"""How the CLI shows things: aligned tables, key/value blocks, JSON, a progress bar.

No dependencies beyond the standard library: the client must install alone.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from client.models import Adapter, TrainingJob


def print_json(value: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(value, indent=None, sort_keys=False, default=str), file=stream or sys.stdout, flush=True)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, widths from the widest cell."""
    texts = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in texts]
    return "\n".join(lines)


def format_pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in pairs)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


# --- records ----------------------------------------------------------------------------------

ADAPTER_COLUMNS = ("ID", "TENANT", "TYPE", "RANK", "VERSION", "MODE", "RESIDENT", "SIZE")
JOB_COLUMNS = ("ID", "ADAPTER", "METHOD", "STATUS", "PROGRESS", "LOSS")


def adapter_row(a: Adapter) -> list[Any]:
    kind = f"{a.type}/{a.variant}" if a.variant and a.variant not in ("default", a.type) else a.type
    return [a.id, a.tenant, kind, a.rank, a.version, a.mode, a.resident, human_bytes(a.size_bytes)]


def adapter_pairs(a: Adapter) -> list[tuple[str, Any]]:
    return [("id", a.id), ("tenant", a.tenant), ("type", a.type), ("variant", a.variant), ("rank", a.rank),
            ("target_modules", a.target_modules), ("size", human_bytes(a.size_bytes)), ("sha256", a.sha256),
            ("version", a.version), ("created_at", a.created_at), ("mode", a.mode), ("resident", a.resident)]


def job_progress(job: TrainingJob) -> str:
    return f"{job.step}/{job.steps}" if job.steps else str(job.step)


def job_row(job: TrainingJob) -> list[Any]:
    return [job.id, job.adapter_id, job.method, job.status, job_progress(job), job.loss]


def job_pairs(job: TrainingJob) -> list[tuple[str, Any]]:
    recent = ", ".join(f"{x:.4g}" for x in job.loss_history[-8:]) or None
    return [("id", job.id), ("adapter_id", job.adapter_id), ("method", job.method), ("tenant", job.tenant),
            ("status", job.status), ("progress", job_progress(job)), ("loss", job.loss),
            ("loss (recent)", recent), ("error", job.error), ("created_at", job.created_at),
            ("started_at", job.started_at), ("finished_at", job.finished_at)]


# --- progress -----------------------------------------------------------------------------------

@dataclass
class ProgressBar:
    """`[#####.....] step 40/100  loss 1.234  ETA 00:12` on stderr.

    On a terminal the line redraws in place; otherwise (CI logs, tests) each
    change is its own line, so nothing is lost to carriage returns.
    """

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    width: int = 24
    clock: Any = time.monotonic
    _origin: tuple[float, int] | None = None
    _drawn: bool = False

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def eta(self, job: TrainingJob) -> float | None:
        now = self.clock()
        if job.status != "running" or not job.steps:
            return None
        if self._origin is None or job.step < self._origin[1]:
            self._origin = (now, job.step)
            return None
        t0, s0 = self._origin
        done = job.step - s0
        return None if done <= 0 else (now - t0) / done * (job.steps - job.step)

    def render(self, job: TrainingJob) -> str:
        frac = job.fraction or 0.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        loss = f"{job.loss:.4f}" if job.loss is not None else "-"
        eta = "done" if job.done else f"ETA {format_duration(self.eta(job))}"
        return f"[{bar}] {job.status:<9} step {job_progress(job)}  loss {loss}  {eta}"

    def update(self, job: TrainingJob) -> None:
        line = self.render(job)
        if self.interactive:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self._drawn = True
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn and self.interactive:
            self.stream.write("\n")
            self.stream.flush()

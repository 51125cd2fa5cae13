"""The real server as a subprocess: `python -m server.cli serve` on 127.0.0.1.

Why a subprocess and not an in-process app: the bench must measure what a
user runs (separate process, real sockets, its own threads and memory), and
the load generator must not share an interpreter (GIL) with the engine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.config import BenchConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    base_url: str
    log_path: Path
    args: list[str]

    def memory(self) -> dict[str, int]:
        """The server process's resident memory in bytes: {"rss", "anon", "file"} (Linux /proc; {} elsewhere).

        Both parts matter for adapters: tensors read from safetensors may stay
        backed by the file's mapping (RssFile) instead of being copied (RssAnon).
        """
        keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
        out: dict[str, int] = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key = keys.get(line.split(":", 1)[0] + ":")
                if key:
                    out[key] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return out

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_args(cfg: BenchConfig, store: Path, port: int, *, max_batch: int | None,
                resident: int | None) -> list[str]:
    """None for both sizes: a plain `loraplex serve` (store, loopback port and model only)."""
    args = ["--store", str(store), "--host", "127.0.0.1", "--port", str(port)]
    if max_batch is not None and resident is not None:
        args += ["--device", cfg.device, "--dtype", cfg.dtype,
                 "--max-batch", str(max_batch), "--max-adapters-resident", str(resident)]
    if cfg.model:
        args += ["--model", cfg.model]
    return args


@contextlib.contextmanager
def spawn(cfg: BenchConfig, store: Path, log_path: Path, *, max_batch: int | None, resident: int | None,
          env: Mapping[str, str] | None = None, startup_timeout_s: float = 300.0) -> Iterator[ServerHandle]:
    """Start the server, wait for /ready, yield it; SIGTERM (then SIGKILL) on exit. `max_batch` and
    `resident` None: the server's defaults, with no sizing flag or setting from the bench either."""
    port = free_port()
    args = server_args(cfg, store, port, max_batch=max_batch, resident=resident)
    sizes = {} if max_batch is None else {"LORAPLEX_MAX_RANK": str(max(64, cfg.rank)),
                                          "LORAPLEX_MAX_QUEUE": str(max(256, 4 * cfg.concurrency))}
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **sizes, **cfg.extra_server_env, **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "server.cli", "serve", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    handle = ServerHandle(proc, f"http://127.0.0.1:{port}", log_path, args)
    try:
        wait_ready(handle.proc, handle.base_url, startup_timeout_s, handle.log_tail)
        yield handle
    finally:
        _stop(proc)
        log_file.close()


def wait_ready(proc: subprocess.Popen, base_url: str, timeout_s: float, log_tail: Callable[[], str],
               poll_s: float = 0.2) -> None:
    """Poll /ready until 200; fail fast (with the log tail) if the process exits first.

    Shared with tests/harness.py's subprocess servers.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(poll_s)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s:\n{log_tail()}")


HOST_GAUGE_RE = re.compile(r"^loraplex_adapters_host\s+([0-9.eE+-]+)$", re.M)


def wait_host_tier(base_url: str, expected: int, timeout_s: float = 180.0, poll_s: float = 0.25) -> float:
    """Wait until the server's start-up prefetch has `expected` adapters in host memory.

    Why: the warm-up loads in the background; measuring while it runs would
    charge its disk reads to whatever scenario comes first. Returns the seconds waited.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            m = HOST_GAUGE_RE.search(httpx.get(f"{base_url}/metrics", timeout=5).text)
            if m and float(m.group(1)) >= expected:
                return time.monotonic() - t0
        time.sleep(poll_s)
    raise TimeoutError(f"host tier did not reach {expected} adapters within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

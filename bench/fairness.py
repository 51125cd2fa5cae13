"""Two-tenant flood: does a heavy tenant's burst push a light tenant's time to first token up?

Tenant A ("heavy") sends `heavy_requests` long requests at once; while they are
queued and running, tenant B ("light") sends `light_requests` short ones at
fixed intervals. B's TTFT is measured idle (before and after the flood) and
under it. Run
with fair admission off, on without preemption and on with it, and with A's
running share capped (`max_concurrent`) or not:

    python -m bench.fairness [--quick] [--model DIR] [--max-batch 8] [--heavy 40] [--heavy-tokens 64]

Fair off, uncapped: B queues behind every A request (FIFO). Fair on without
preemption: B takes the next row that frees (it has the least service), so it
waits for one A request to end, not for all of them. With preemption: B, below
its share of the rows, preempts A's youngest running sequence and starts at
once. With A capped below the batch, B finds a free row at once, whatever the order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

from bench.config import BenchConfig
from bench.load import GenRequest, percentile, stream_one
from bench.process import spawn

HEAVY_KEY = "heavy-key-0001"
ADMIN_KEY = "admin-key-0001"  # reads the server's metrics (sends no traffic)
LIGHT_KEY = "light-key-0001"
HEAVY_PROMPT = "Tell me a long story about the sea and the ships that sail on it."
LIGHT_PROMPT = "Hi!"


@dataclass(frozen=True)
class Flood:
    heavy_requests: int = 40
    heavy_tokens: int = 64
    light_requests: int = 5
    light_tokens: int = 2
    settle_s: float = 0.3  # after A's burst is sent, before B's first probe: A's requests are queued
    probe_interval_s: float = 0.05  # between B's probes' sends
    light_prompt: str = LIGHT_PROMPT
    timeout_s: float = 120.0


@dataclass
class FloodResult:
    idle_ttft_s: list[float]
    loaded_ttft_s: list[float]
    heavy_ok: int
    heavy_s: float  # A's burst, first send to last answer
    heavy_texts: int = 0  # distinct texts among A's answers (identical greedy requests: 1, preempted or not)

    @property
    def ratio(self) -> float:
        """B's p50 TTFT under the flood over its idle p50."""
        return percentile(self.loaded_ttft_s, 50) / percentile(self.idle_ttft_s, 50)

    def row(self) -> dict[str, float]:
        return {"idle_p50_ms": round(1000 * percentile(self.idle_ttft_s, 50), 1),
                "loaded_p50_ms": round(1000 * percentile(self.loaded_ttft_s, 50), 1),
                "loaded_max_ms": round(1000 * max(self.loaded_ttft_s, default=math.nan), 1),
                "ratio": round(self.ratio, 2), "heavy_ok": self.heavy_ok, "heavy_s": round(self.heavy_s, 2)}


def keys_file(path: Path, heavy_cap: int | None = None) -> Path:
    """The two tenants' keys; A's running sequences capped at `heavy_cap` when given."""
    tenants = {"heavy": {"max_concurrent": heavy_cap}} if heavy_cap is not None else {}
    keys = {HEAVY_KEY: {"tenant": "heavy"}, LIGHT_KEY: {"tenant": "light"}, ADMIN_KEY: {"tenant": "ops", "admin": True}}
    path.write_text(json.dumps({"keys": keys, "tenants": tenants}))
    path.chmod(0o600)
    return path


async def run_flood(base_url: str, flood: Flood = Flood()) -> FloodResult:
    """Idle probes, A's burst with B's probes inside it, idle probes again; bounded by `flood.timeout_s`.

    A's burst runs in a process of its own: receiving and parsing forty answers in the probing process
    would delay B's reads and be measured as the server's latency."""
    async with asyncio.timeout(flood.timeout_s):
        light = _client(base_url, LIGHT_KEY, flood.light_requests, flood.timeout_s)
        async with light:
            probe = GenRequest(flood.light_prompt, None, flood.light_tokens)
            await stream_one(light, probe)  # warm-up: first-request costs are not the idle value
            idle = await _probes(light, probe, flood.light_requests)
            with HeavyBurst(base_url, flood) as burst:
                await asyncio.to_thread(burst.wait_sent)
                loaded = await _spaced_probes(light, probe, flood)
                answers, heavy_s = await asyncio.to_thread(burst.result)
            idle += await _probes(light, probe, flood.light_requests)  # idle on both sides of the flood: drift
            texts = {text for status, text in answers if status == 200}
            return FloodResult(idle, loaded, sum(s == 200 for s, _ in answers), heavy_s, len(texts))


class HeavyBurst:
    """Tenant A's burst in a child process: `wait_sent` once every request is on the wire, then `result`."""

    def __init__(self, base_url: str, flood: Flood) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._timeout_s = flood.timeout_s
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_heavy_main, args=(base_url, flood, child), daemon=True)

    def __enter__(self) -> HeavyBurst:
        self._proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)

    def wait_sent(self) -> None:
        if not self._conn.poll(self._timeout_s) or self._conn.recv() != "sent":
            raise RuntimeError("the heavy tenant's burst did not start")

    def result(self) -> tuple[list[tuple[int, str]], float]:
        if not self._conn.poll(self._timeout_s):
            raise RuntimeError("the heavy tenant's burst did not finish in time")
        return self._conn.recv()


def _heavy_main(base_url: str, flood: Flood, conn: Connection) -> None:
    async def burst() -> tuple[list[tuple[int, str]], float]:
        async with _client(base_url, HEAVY_KEY, flood.heavy_requests, flood.timeout_s) as heavy:
            started = time.perf_counter()
            tasks = [asyncio.create_task(_heavy_one(heavy, flood.heavy_tokens)) for _ in range(flood.heavy_requests)]
            await asyncio.sleep(0)  # every task has sent (or queued) its request
            conn.send("sent")
            answers = await asyncio.gather(*tasks)
            return answers, time.perf_counter() - started
    conn.send(asyncio.run(burst()))


async def _spaced_probes(client: httpx.AsyncClient, probe: GenRequest, flood: Flood) -> list[float]:
    """B's probes sent at fixed times into the flood, each on its own connection: one that waits
    long does not delay the next one's send (sequential probes would all land after a FIFO flood)."""
    async def one(i: int) -> float:
        await asyncio.sleep(flood.settle_s + i * flood.probe_interval_s)
        (ttft,) = await _probes(client, probe, 1)
        return ttft
    return list(await asyncio.gather(*(one(i) for i in range(flood.light_requests))))


def _client(base_url: str, key: str, connections: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=connections + 1))


async def _probes(client: httpx.AsyncClient, probe: GenRequest, count: int) -> list[float]:
    results = [await stream_one(client, probe) for _ in range(count)]
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"light tenant's probe failed: {bad[0].status} {bad[0].error}")
    return [r.ttft_s for r in results]


async def _heavy_one(client: httpx.AsyncClient, tokens: int) -> tuple[int, str]:
    body = {"prompt": HEAVY_PROMPT, "max_new_tokens": tokens, "ignore_eos": True}
    response = await client.post("/generate", json=body)
    return response.status_code, response.json().get("text", "") if response.status_code == 200 else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--heavy", type=int, default=40)
    parser.add_argument("--heavy-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every configuration")
    parser.add_argument("--quick", action="store_true", help="a short flood: 16 heavy requests of 32 tokens")
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=args.model, device="cpu", dtype="float32")
    heavy, tokens = (16, 32) if args.quick else (args.heavy, args.heavy_tokens)
    flood = Flood(heavy_requests=heavy, heavy_tokens=tokens)
    cap = args.max_batch - 2
    # (fair_scheduling, preemption, A's max_concurrent)
    configs = [(False, False, None), (True, False, None), (True, True, None), (False, False, cap), (True, True, cap)]
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        for round_ in range(args.rounds):
            for fair, preempt, heavy_cap in configs:
                keys = keys_file(Path(tmp) / f"keys-{heavy_cap}.json", heavy_cap)
                env = {"LORAPLEX_API_KEYS": str(keys), "LORAPLEX_FAIR_SCHEDULING": str(fair).lower(),
                       "LORAPLEX_PREEMPTION": str(preempt).lower()}
                with spawn(cfg, Path(tmp) / "store", Path(tmp) / "server.log", max_batch=args.max_batch,
                           resident=args.max_batch, env=env) as server:
                    result = asyncio.run(run_flood(server.base_url, flood))
                    preempted = preemptions(server.base_url)
                print(json.dumps({"round": round_, "fair_scheduling": fair, "preemption": preempt,
                                  "heavy_max_concurrent": heavy_cap, **result.row(),
                                  "heavy_preempted": preempted}), flush=True)
    return 0


def preemptions(base_url: str) -> int:
    """How many of A's running sequences the server preempted (an admin's metrics view: tenants do not see it)."""
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    found = re.search(r'^loraplex_tenant_preemptions_total\{tenant="heavy"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


if __name__ == "__main__":
    raise SystemExit(main())

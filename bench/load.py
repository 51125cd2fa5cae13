"""The load generator: many concurrent SSE streams on `POST /generate`, bounded in count and time.

Why client-side timestamps: the numbers users feel are throughput and the gap
between tokens as they arrive over real HTTP, so every `data:` event's arrival
time is recorded and the statistics are computed from those, not from the
server's own counters.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class GenRequest:
    prompt: str
    adapter_id: str | None
    max_new_tokens: int


@dataclass
class GenResult:
    request: GenRequest
    ok: bool = False
    status: int = 0
    error: str = ""
    text: str = ""
    finish_reason: str = ""
    completion_tokens: int = 0
    t_send: float = 0.0
    t_first: float = math.nan  # first token event
    t_end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival time of each token event

    @property
    def ttft_s(self) -> float:
        return self.t_first - self.t_send

    @property
    def decode_rate(self) -> float:
        """Tokens/s of this stream after its first token; NaN with fewer than two token events."""
        t = self.token_times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) >= 2 and t[-1] > t[0] else math.nan

    def gaps(self) -> list[float]:
        """Inter-token latencies (s) of this stream."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class LoadRun:
    results: list[GenResult]
    t_start: float
    t_end: float

    @property
    def wall_s(self) -> float:
        return self.t_end - self.t_start

    @property
    def failed(self) -> list[GenResult]:
        return [r for r in self.results if not r.ok]

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results if r.ok)

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole run (first send → last token); NaN if nothing came."""
        return self.tokens / self.wall_s if self.wall_s > 0 and self.tokens else math.nan

    @property
    def decode_throughput(self) -> float:
        """Σ over streams of each one's decode rate: tokens/s of the batch with every stream in it.

        Why beside `throughput`: an adapter changes what the model says, so some
        of its streams may stop early (EOS) while the base runs all to
        max_new_tokens; whole-run tokens/s then charges the adapter for writing
        less. Each stream's own rate is measured while it is in the batch, so
        this compares equal work per engine step (prefill excluded).
        """
        rates = [r.decode_rate for r in self.results if r.ok]
        rates = [x for x in rates if x == x]
        return sum(rates) if rates else math.nan

    def gaps(self, t_from: float = -math.inf, t_to: float = math.inf) -> list[float]:
        """All inter-token gaps whose later token arrived in [t_from, t_to]."""
        out: list[float] = []
        for r in self.results:
            t = r.token_times
            out.extend(b - a for a, b in zip(t, t[1:]) if t_from <= b <= t_to)
        return out

    def summary(self) -> dict[str, float | int]:
        gaps = self.gaps()
        ttfts = [r.ttft_s for r in self.results if r.ok and not math.isnan(r.t_first)]
        return {
            "requests": len(self.results),
            "failed": len(self.failed),
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "tok_per_s": round(self.throughput, 2),
            "decode_tok_per_s": round(self.decode_throughput, 2),
            "itl_p50_ms": round(1000 * percentile(gaps, 50), 2),
            "itl_p99_ms": round(1000 * percentile(gaps, 99), 2),
            "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 2),
            "mean_completion_tokens": round(self.tokens / max(1, len(self.results) - len(self.failed)), 1),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile; NaN for no data (never a made-up number)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def stream_one(client: httpx.AsyncClient, req: GenRequest) -> GenResult:
    """One streamed greedy generation; every failure is recorded, never raised."""
    res = GenResult(req, t_send=time.perf_counter())
    body = {"prompt": req.prompt, "adapter_id": req.adapter_id, "max_new_tokens": req.max_new_tokens,
            "temperature": 0.0, "stream": True}
    try:
        async with client.stream("POST", "/generate", json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = (await resp.aread()).decode(errors="replace")[:500]
                return res
            await _consume_sse(resp, res)
    except (httpx.HTTPError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.t_end = time.perf_counter()
    return res


async def _consume_sse(resp: httpx.Response, res: GenResult) -> None:
    parts: list[str] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        now = time.perf_counter()
        if data == "[DONE]":
            res.ok = bool(res.finish_reason) and not res.error
            break
        event = json.loads(data)
        if "error" in event:
            res.error = json.dumps(event["error"])[:500]
        final = bool(event.get("finish_reason"))
        if final:
            res.finish_reason = event["finish_reason"]
            usage = event.get("usage") or {}
            res.completion_tokens = int(usage.get("completion_tokens", len(res.token_times)))
        if "text" in event and (event["text"] or not final):
            if math.isnan(res.t_first):
                res.t_first = now
            res.token_times.append(now)
            parts.append(event.get("text", ""))
    res.text = "".join(parts)
    if res.finish_reason == "cancelled":
        res.ok = False
        res.error = res.error or "cancelled by the server"


def client_for(base_url: str, concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(timeout_s, connect=30.0))


async def run_load_async(base_url: str, requests: Sequence[GenRequest], concurrency: int,
                         timeout_s: float) -> LoadRun:
    """Closed loop: at most `concurrency` streams in flight; the whole run is cut at `timeout_s`."""
    sem = asyncio.Semaphore(concurrency)
    async with client_for(base_url, concurrency, timeout_s) as client:
        async def guarded(req: GenRequest) -> GenResult:
            async with sem:
                return await stream_one(client, req)

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(guarded(r)) for r in requests]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        results = []
        for task, req in zip(tasks, requests):
            if task in done and not task.cancelled() and task.exception() is None:
                results.append(task.result())
            else:
                results.append(GenResult(req, error=f"not finished within the run limit of {timeout_s:.0f}s"))
        t1 = max([r.t_end for r in results if r.ok] or [time.perf_counter()])
        return LoadRun(results, t0, t1)


def run_load(base_url: str, requests: Sequence[GenRequest], concurrency: int, timeout_s: float) -> LoadRun:
    return asyncio.run(run_load_async(base_url, requests, concurrency, timeout_s))

"""Prefix cache: TTFT and throughput of a shared 512-token system prompt over 8 adapters, cache on vs off.

A real server per configuration (`loraplex serve`, CPU float32, the embedded SmolLM2-135M unless --model),
eight LoRA adapters of one tenant, every prompt = the same 512-token system prompt + a short question.
Each server first answers one request per adapter (loads the adapters; with the cache on, it also stores
each adapter's system-prompt blocks), then:
- ttft: one request at a time, a new question per adapter (TTFT is then prefill plus one step, no queue);
- load: R requests over the 8 adapters, C in flight (tok/s over the run, TTFT p50 under load).
Configurations alternate within a round and rounds repeat (the machine is shared); ratios are on/off.

    python -m bench.prefix_cache [--rounds N] [--requests R] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.adapters import make_adapters
from bench.config import BenchConfig
from bench.load import GenRequest, run_load_async
from bench.process import spawn

ADAPTERS = 8
SYSTEM_TOKENS = 512
TARGET_TTFT_RATIO = 0.3
POLICY = ("You are the support assistant of a regional train company. Be brief and exact. Tickets can be "
          "changed free of charge until departure; refunds take five working days. Bicycles travel free "
          "outside rush hours; dogs need a child ticket. Delays over thirty minutes earn a voucher. ")
QUESTIONS = ["Can I bring my bike at 8am?", "How long do refunds take?", "My train was 45 minutes late.",
             "Does my dog need a ticket?", "Can I change my ticket after departure?", "Is there wifi?",
             "Where do I buy a ticket?", "Can I get a voucher for a 10 minute delay?"]


def system_prompt(model_dir: Path) -> str:
    """POLICY repeated and cut to exactly SYSTEM_TOKENS tokens of the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(POLICY * 40, add_special_tokens=False)["input_ids"][:SYSTEM_TOKENS]
    return tok.decode(ids)


def model_dir(cfg: BenchConfig) -> Path:
    if cfg.model:
        return Path(cfg.model)
    from server.model.load import ensure_embedded_cache
    from server.settings import Settings

    return ensure_embedded_cache(Settings().cache_dir)


def requests(system: str, ids: Sequence[str], count: int, offset: int, new_tokens: int) -> list[GenRequest]:
    return [GenRequest(system + "\nQuestion: " + QUESTIONS[(i + offset) % len(QUESTIONS)] + "\nAnswer:",
                       ids[i % len(ids)], new_tokens) for i in range(count)]


async def measure(base_url: str, system: str, ids: Sequence[str], count: int, concurrency: int) -> dict:
    warm = await run_load_async(base_url, requests(system, ids, len(ids), 0, 4), len(ids), 600)
    ttft = await run_load_async(base_url, requests(system, ids, len(ids), 1, 4), 1, 600)
    load = await run_load_async(base_url, requests(system, ids, count, 2, 16), concurrency, 600)
    failed = len(warm.failed) + len(ttft.failed) + len(load.failed)
    return {"ttft_p50_ms": ttft.summary()["ttft_p50_ms"], "load_ttft_p50_ms": load.summary()["ttft_p50_ms"],
            "tok_per_s": load.summary()["tok_per_s"], "failed": failed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=args.model, device="cpu", dtype="float32")
    directory = model_dir(cfg)
    system = system_prompt(directory)
    ids = [f"support-{i}" for i in range(ADAPTERS)]
    rows: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        from transformers import AutoModelForCausalLM

        make_adapters(AutoModelForCausalLM.from_pretrained(directory), "lora", ids, Path(tmp) / "store",
                      cfg.rank, seed=1)
        for round_ in range(args.rounds):
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for name in order:
                env = {} if name == "on" else {"LORAPLEX_PREFIX_CACHE_TOKENS": "0"}
                with spawn(cfg, Path(tmp) / "store", Path(tmp) / "server.log", max_batch=args.concurrency,
                           resident=ADAPTERS, env=env) as server:
                    row = asyncio.run(measure(server.base_url, system, ids, args.requests, args.concurrency))
                rows[name].append(row)
                print(json.dumps({"round": round_, "cache": name, **row, "load1": os.getloadavg()[0]}),
                      flush=True)
    ratio = {k: round(statistics.median(a[k] / b[k] for a, b in zip(rows["on"], rows["off"], strict=True)), 3)
             for k in ("ttft_p50_ms", "load_ttft_p50_ms", "tok_per_s")}
    print(json.dumps({"on_over_off_median": ratio, "ttft_target": TARGET_TTFT_RATIO,
                      "met": ratio["ttft_p50_ms"] <= TARGET_TTFT_RATIO}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

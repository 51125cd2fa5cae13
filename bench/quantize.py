"""Bytes of the base and tokens/s per `--quantize` mode, on this machine's CPU, for the embedded SmolLM2.

Why: weight-only quantization is a memory trade; the README states what it saves and what it costs in
speed here. One Engine per mode (the real scheduler, runner and sampler; no HTTP) serves the same greedy
requests with EOS ignored, at batch 1 (one stream) and at batch 8; rounds alternate which mode goes first
and the table reports the median over rounds and each mode's ratio to `none` within a round. int4 runs on
CUDA only (server/model/quantize.py): on a CPU its row says so and nothing is measured. nf4 is bitsandbytes'
Linear4bit computing in float32 (its AVX512-BF16 repack off, as the server runs it).

    python -m bench.quantize [--quick] [--rounds N] [--threads T]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from bench.engine_requests import generate
from bench.workload import PROMPTS
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.load import load_base
from server.model.quantize import model_bytes
from server.settings import Settings

MODES = ("none", "int8", "nf4")
BATCHES = (1, 8)


async def _serve(engine: Engine, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    done = await asyncio.gather(*(generate(engine, ids, params) for ids in prompts))
    return sum(len(t) for choices in done for t in choices)


def rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    t0 = time.perf_counter()
    tokens = asyncio.run(_serve(engine, prompts, new_tokens))
    return tokens / (time.perf_counter() - t0)


def measure(new_tokens: int, rounds: int) -> tuple[dict[str, int], dict[tuple[str, int], list[float]]]:
    engines: dict[str, Engine] = {}
    sizes: dict[str, int] = {}
    for mode in MODES:
        settings = Settings(device="cpu", dtype="float32", max_batch=max(BATCHES), quantize=mode)
        base = load_base(settings)
        sizes[mode] = model_bytes(base.model)
        engines[mode] = Engine(base, settings)
        tokenizer = base.tokenizer
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(max(BATCHES))]
    rates: dict[tuple[str, int], list[float]] = {(m, b): [] for m in MODES for b in BATCHES}
    for engine in engines.values():
        engine.start()
    try:
        for engine in engines.values():
            rate(engine, prompts[:2], 2)  # warm-up: first-call work
        for k in range(rounds):
            order = MODES if k % 2 == 0 else tuple(reversed(MODES))
            for batch in BATCHES:
                for mode in order:
                    rates[(mode, batch)].append(rate(engines[mode], prompts[:batch], new_tokens))
    finally:
        for engine in engines.values():
            engine.stop()
    return sizes, rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 tokens, 1 round (default 64 tokens, 3 rounds)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    new_tokens, rounds = (16, 1) if a.quick else (64, 3)
    rounds = a.rounds or rounds
    load = os.getloadavg()[0]
    sizes, rates = measure(new_tokens, rounds)
    print(f"SmolLM2-135M, greedy x {new_tokens} tokens, {torch.get_num_threads()} thread(s), {rounds} interleaved "
          f"round(s), load average {load:.2f} -> {os.getloadavg()[0]:.2f}; tokens/s (median over rounds)")
    head = " | ".join(f"batch {b} tokens/s (vs none)" for b in BATCHES)
    print(f"| --quantize | bytes of the base | {head} |\n|---|---|" + "---|" * len(BATCHES))
    for mode in MODES:
        cells = []
        for b in BATCHES:
            ratio = statistics.median(x / y for x, y in zip(rates[(mode, b)], rates[("none", b)]))
            cells.append(f"{statistics.median(rates[(mode, b)]):.1f} ({ratio:.2f}x)")
        print(f"| {mode} | {sizes[mode] / 2**20:.0f} MiB ({sizes[mode] / sizes['none']:.2f}x) | "
              + " | ".join(cells) + " |")
    print("| int4 | CUDA only (bfloat16, tinygemm): refused on the CPU | – | – |", flush=True)


if __name__ == "__main__":
    main()

"""The base engine against transformers' own static-batch `generate`, on the same 32 requests.

Why: a continuous-batching engine earns its keep only if, on a load a static
batch also fits (every request present at once, all the same length), it is
at least as fast as the library it wraps. Both sides run in this process on
the default model with the same thread count: the real Engine (scheduler,
runner, sampler, detokenizer and streams; no HTTP) serves 32 greedy requests
of `max_new_tokens` each with EOS ignored; transformers' `generate` runs the
same 32 prompts as one left-padded batch, greedy, `min_new_tokens =
max_new_tokens` (so both produce exactly the same token count), its model
loaded as transformers loads it (SDPA attention; the engine serves with its
default settings, so its Linear weights are column-major: `--row-major` turns
that off to compare the step machinery alone). Rounds alternate which side
goes first; the ratio is the median over rounds of engine tokens/s over
generate's tokens/s of the same round. Target >= 1.0.

    python -m bench.vs_generate [--quick] [--rounds N] [--threads T]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from bench.workload import PROMPTS
from bench.engine_requests import generate
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.load import load_base, resolve_model_path
from server.settings import Settings

TARGET = 1.0


async def _serve(engine: Engine, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    done = await asyncio.gather(*(generate(engine, ids, params) for ids in prompts))
    return sum(len(t) for choices in done for t in choices)


def engine_rate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    t0 = time.perf_counter()
    tokens = asyncio.run(_serve(engine, prompts, new_tokens))
    return tokens / (time.perf_counter() - t0)


def generate_rate(model, tokenizer, prompts: list[str], new_tokens: int) -> float:
    t0 = time.perf_counter()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return tokens / (time.perf_counter() - t0)


def measure(requests: int, new_tokens: int, rounds: int,
            column_major: bool = True) -> tuple[list[float], list[float]]:
    settings = Settings(device="cpu", dtype="float32", max_batch=requests, cpu_column_major=column_major)
    base = load_base(settings)
    engine = Engine(base, settings)
    tokenizer = base.tokenizer
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    path, _ = resolve_model_path(settings)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    engine.start()
    ours: list[float] = []
    theirs: list[float] = []
    try:
        engine_rate(engine, prompts[:2], 2)  # warm-up: first-call work on both sides
        generate_rate(hf, tokenizer, texts[:2], 2)
        for k in range(rounds):
            if k % 2 == 0:
                ours.append(engine_rate(engine, prompts, new_tokens))
                theirs.append(generate_rate(hf, tokenizer, texts, new_tokens))
            else:
                theirs.append(generate_rate(hf, tokenizer, texts, new_tokens))
                ours.append(engine_rate(engine, prompts, new_tokens))
    finally:
        engine.stop()
    return ours, theirs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.vs_generate", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 requests x 16 tokens, 1 round (default 32 x 64, 3)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--row-major", action="store_true",
                   help="serve with cpu_column_major off: the engine's weights laid out as transformers loads them")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    requests, new_tokens, rounds = (8, 16, 1) if a.quick else (32, 64, 3)
    rounds = a.rounds or rounds
    load = os.getloadavg()[0]
    ours, theirs = measure(requests, new_tokens, rounds, column_major=not a.row_major)
    ratio = statistics.median(o / t for o, t in zip(ours, theirs))
    print(f"{requests} greedy requests x {new_tokens} tokens, {torch.get_num_threads()} thread(s), {rounds} "
          f"interleaved round(s), load average {load:.2f} -> {os.getloadavg()[0]:.2f}; tokens/s (median)")
    print("| engine tokens/s | generate tokens/s | ratio | verdict |\n| --- | --- | --- | --- |")
    print(f"| {statistics.median(ours):.0f} | {statistics.median(theirs):.0f} | {ratio:.2f}x | "
          f"{'PASS' if ratio >= TARGET else 'MISS'} |", flush=True)


if __name__ == "__main__":
    main()

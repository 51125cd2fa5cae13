"""Cost rows of the decoding features: throughput with logprobs, with n = 4, with a JSON schema on half the batch.

Why in process: the question is what each feature adds to the engine's step
(processors, masks, logprob extraction, KV forks), so the real Engine serves
the embedded model directly (no HTTP noise). Every configuration decodes the
same load (R sequences x T tokens, EOS ignored so each runs its full length)
and is reported as a ratio to plain greedy of the same round; rounds are
interleaved and the median ratio is kept (the machine is shared and noisy).

    python -m bench.decoding [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace

import torch

from bench.workload import PROMPTS
from bench.engine_requests import generate
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.engine.request import SamplingParams
from server.model.load import load_base
from server.settings import Settings

TARGET = 0.9
# A long required string: the grammar stays active (and masks every step) for the whole run.
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


async def _run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> int:
    """Submit every job at once; generated tokens once all have finished."""
    done = await asyncio.gather(*(generate(engine, ids, params) for ids, params in jobs))
    return sum(len(t) for choices in done for t in choices)


def configs(prompts: list[list[int]], new_tokens: int, grammar) -> dict[str, list[tuple[list[int], SamplingParams]]]:
    """The same R sequences x T tokens under each feature."""
    plain = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    r = len(prompts)
    return {
        "plain greedy": [(p, plain) for p in prompts],
        "logprobs (top 5)": [(p, replace(plain, logprobs=5)) for p in prompts],
        "n=4 (seeded sampling)": [(p, replace(plain, n=4, temperature=0.8, seed=i))
                                  for i, p in enumerate(prompts[:r // 4])],
        "JSON schema on half": [(p, replace(plain, grammar=grammar) if i % 2 else plain) for i, p in enumerate(prompts)],
    }


def measure(requests: int, new_tokens: int, rounds: int) -> dict[str, list[float]]:
    settings = Settings(device="cpu", dtype="float32", max_batch=requests)
    base = load_base(settings)
    engine = Engine(base, settings)
    grammars = GrammarCompiler(base.tokenizer, engine.vocab, engine.eos_ids)
    grammar = asyncio.run(grammars.get("json_schema", SCHEMA, "json_schema"))
    engine.start()
    tok = base.tokenizer
    prompts = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(requests)]
    runs = configs(prompts, new_tokens, grammar)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for jobs in runs.values():  # warm-up: every path once
            asyncio.run(_run(engine, [(ids, replace(p, max_new_tokens=2)) for ids, p in jobs[:2]]))
        for k in range(rounds):
            names = list(runs)
            for name in names[k % len(names):] + names[:k % len(names)]:
                t0 = time.perf_counter()
                tokens = asyncio.run(_run(engine, runs[name]))
                rates[name].append(tokens / (time.perf_counter() - t0))
    finally:
        engine.stop()
        grammars.close()
    return rates


def ratios(rates: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of each config's throughput / plain greedy's of the same round."""
    base = rates["plain greedy"]
    return {name: statistics.median(v / b for v, b in zip(values, base)) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.decoding", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 sequences x 16 tokens, 1 round (default 32 x 64, 3)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    requests, new_tokens, rounds = (8, 16, 1) if a.quick else (32, 64, 3)
    rates = measure(requests, new_tokens, a.rounds or rounds)
    print(f"{requests} sequences x {new_tokens} tokens, {torch.get_num_threads()} threads, "
          f"{a.rounds or rounds} round(s); tokens/s (median) and ratio to plain greedy (target >= {TARGET})")
    print("| config | tokens/s | ratio | verdict |\n| --- | --- | --- | --- |")
    for name, r in ratios(rates).items():
        verdict = "" if name == "plain greedy" else ("PASS" if r >= TARGET else "MISS")
        print(f"| {name} | {statistics.median(rates[name]):.0f} | {r:.2f}x | {verdict} |", flush=True)


if __name__ == "__main__":
    main()

"""The requests every scenario sends: fixed prompts, adapters assigned deterministically.

Why fixed and seeded: "the same load" for base and adapters must mean the same
prompts in the same order with the same lengths, so a ratio compares adapter
cost and nothing else; and PEFT must get exactly the requests loraplex got.
Prompts are open-ended story/essay starters so greedy decoding rarely stops
early (every request should produce close to `max_new_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.load import GenRequest

PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins in",
    "Write a long story about a robot who learns to paint. The robot",
    "In the middle of the desert, the travellers found",
    "The three most important ideas in modern physics are",
    "Dear diary, today was the strangest day of my life because",
    "The recipe for a perfect loaf of bread starts with",
    "A detailed guide to planting a vegetable garden: first,",
    "The old lighthouse keeper looked out at the storm and",
    "Chapter one. The city had never been so quiet. Detective Mora",
    "Explain, step by step, how a bicycle stays upright while",
    "The mountain trail wound upward through pine forests until",
    "Scientists announced today that a new species of frog",
    "My grandmother always told me stories about the war, and",
    "The spaceship drifted past the rings of Saturn while the crew",
    "A brief history of coffee: it was first discovered",
)


def assign(adapters: Sequence[str | None], n: int, new_tokens: int, offset: int = 0) -> list[GenRequest]:
    """n requests; request i uses prompt (i + offset) and adapter i mod len(adapters)."""
    return [GenRequest(PROMPTS[(i + offset) % len(PROMPTS)], adapters[i % len(adapters)], new_tokens)
            for i in range(n)]


def drawn(ids: Sequence[str], n: int, new_tokens: int, dist: str, seed: int) -> list[GenRequest]:
    """n requests whose adapters are drawn from `ids` uniformly or Zipf(1.0) (rank k has p ∝ 1/k)."""
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        picks = rng.integers(0, len(ids), size=n)
    elif dist == "zipf":
        weights = 1.0 / np.arange(1, len(ids) + 1)
        picks = rng.choice(len(ids), size=n, p=weights / weights.sum())
        # Which ids are popular is arbitrary: shuffle ranks so popularity is not tied to id order.
        perm = rng.permutation(len(ids))
        picks = perm[picks]
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return [GenRequest(PROMPTS[i % len(PROMPTS)], ids[int(p)], new_tokens) for i, p in enumerate(picks)]


def distinct_adapters(requests: Sequence[GenRequest]) -> int:
    return len({r.adapter_id for r in requests if r.adapter_id is not None})

"""Everything done before a server starts: adapters on disk and reference outputs.

Why first: the references (PEFT's and plain transformers' greedy texts) are
computed in the bench process on the same cores the server would use, so they
run while no server exists, and the server's outputs are checked against them
later. Scenario 2's timed PEFT baselines run inside the scenario, paired with
the server's runs round by round.
"""

from __future__ import annotations

import time

import torch

from bench import peft_baseline as pb
from bench.adapters import make_adapters
from bench.context import Bench
from bench.load import GenRequest
from bench.workload import PROMPTS, assign


def lora_ids(n: int) -> list[str]:
    return [f"lora-{i:03d}" for i in range(n)]


def mix_count(ctx: Bench) -> int:
    """Distinct adapters in the 50/50 LoRA/MiSS mix: 16, or the largest count a quick run uses."""
    return min(16, max(ctx.cfg.adapter_counts))


def mix_ids(ctx: Bench) -> list[str]:
    """Alternating LoRA / MiSS ids, so round-robin requests split 50/50."""
    half = mix_count(ctx) // 2
    out: list[str] = []
    for i in range(half):
        out += [ctx.lora[i].adapter_id, ctx.miss[i].adapter_id]
    return out


def s2_requests(ctx: Bench) -> list[GenRequest]:
    """Scenario 2's shared request set: one full batch over `peft_adapters` distinct LoRA adapters."""
    ids = [s.adapter_id for s in ctx.lora[:ctx.cfg.peft_adapters]]
    return assign(ids, ctx.cfg.concurrency, ctx.cfg.new_tokens)


def make_all_adapters(ctx: Bench) -> None:
    cfg = ctx.cfg
    n_lora = max(max(cfg.adapter_counts), cfg.peft_adapters, cfg.scale_distinct_files)
    n_cold = cfg.cold_probes if 3 in cfg.scenarios else 0  # more are placed after start-up (s3)
    t0 = time.perf_counter()
    ctx.lora = make_adapters(ctx.bm.model, "lora", lora_ids(n_lora), ctx.store, cfg.rank, seed=cfg.seed + 1)
    ctx.miss = make_adapters(ctx.bm.model, "miss", [f"miss-{i:03d}" for i in range(mix_count(ctx) // 2)],
                             ctx.store, cfg.rank, seed=cfg.seed + 2)
    ctx.cold = make_adapters(ctx.bm.model, "lora", [f"cold-{i:03d}" for i in range(n_cold)], ctx.store,
                             cfg.rank, seed=cfg.seed + 3)
    ctx.log(f"made {len(ctx.lora)} LoRA, {len(ctx.miss)} MiSS, {len(ctx.cold)} cold adapters with PEFT "
            f"(rank {cfg.rank}, all linear layers) in {time.perf_counter() - t0:.1f} s; "
            f"LoRA {ctx.lora[0].tensor_bytes / 2**20:.1f} MiB, MiSS {ctx.miss[0].tensor_bytes / 2**20:.1f} MiB each")
    ctx.data["adapters"] = {"lora": len(ctx.lora), "miss": len(ctx.miss), "cold": len(ctx.cold),
                            "rank": cfg.rank, "lora_tensor_bytes": ctx.lora[0].tensor_bytes,
                            "miss_tensor_bytes": ctx.miss[0].tensor_bytes}


@torch.inference_mode()
def make_references(ctx: Bench) -> None:
    """PEFT / plain-transformers greedy texts for a MiSS request and a base-only request."""
    bm, n = ctx.bm, ctx.cfg.new_tokens
    if ctx.miss:
        req = GenRequest(PROMPTS[3], ctx.miss[0].adapter_id, n)
        ctx.references.append(("miss_vs_peft", req, pb.reference_texts(bm, ctx.miss[0], [req])[0]))
    req = GenRequest(PROMPTS[0], None, n)  # the prompt of scenario 2's first (LoRA) request
    ctx.references.append(("base_vs_transformers", req, pb.greedy_one(bm.model, bm, req)[0]))

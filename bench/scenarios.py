"""Scenarios 1 (adapter overhead), 2 (against PEFT) and 5 (merged tenant) on the main server.

Why interleaved rounds: the machine is shared and noisy, so each round runs
every configuration once (in a rotated order) and each ratio is taken against
the reference run *of the same round* (base-only in scenarios 1 and 5, PEFT in
scenario 2); the reported ratio is the median over rounds. Absolute figures are kept as information.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from peft import PeftModel

from bench import peft_baseline as pb
from bench.context import Bench, Check, median, ratio
from bench.load import GenRequest, LoadRun
from bench.prepare import mix_ids, s2_requests
from bench.process import ServerHandle, spawn, wait_host_tier
from bench.report import Row
from bench.workload import assign, distinct_adapters
from server.settings import Settings

THROUGHPUT_TARGET_16 = 0.90
NAIVE_TARGET = 10.0
MIXED_TARGET = 2.0
MERGED_TARGET = 0.98
DEFAULTS_TARGET = 0.70  # adapters on a server run with its defaults, against its own base-only load


# --- scenario 1 -----------------------------------------------------------------------------

def s1_configs(ctx: Bench) -> dict[str, list[str | None]]:
    configs: dict[str, list[str | None]] = {"base": [None]}
    for n in ctx.cfg.adapter_counts:
        configs[f"lora x{n}"] = [s.adapter_id for s in ctx.lora[:n]]
    if ctx.miss:
        configs[f"lora+miss x{len(mix_ids(ctx))}"] = list(mix_ids(ctx))
    return configs


def scenario1(ctx: Bench, h: ServerHandle) -> None:
    cfg = ctx.cfg
    configs = s1_configs(ctx)
    ctx.log(f"scenario 1: {list(configs)}; {cfg.requests_per_run} requests x {cfg.new_tokens} tokens per run, "
            f"concurrency {cfg.concurrency}, {cfg.s1_repeats} interleaved round(s)")
    ctx.warm_up(h, [a for ids in configs.values() for a in ids])
    runs = _s1_rounds(ctx, h, configs, "s1")
    ctx.data["s1"] = {"configs": {n: {"adapters": len([a for a in ids if a])} for n, ids in configs.items()},
                      "runs": runs, "ratios": _s1_ratios(runs)}
    _s1_rows(ctx, configs, ctx.data["s1"]["ratios"], runs)


def _s1_rounds(ctx: Bench, h: ServerHandle, configs: dict[str, list[str | None]],
               label: str) -> dict[str, list[dict[str, Any]]]:
    """`s1_repeats` rounds, each running every config once in a rotated order: summaries by config."""
    cfg = ctx.cfg
    names = list(configs)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(cfg.s1_repeats):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            run = ctx.measure(h, assign(configs[name], cfg.requests_per_run, cfg.new_tokens), f"{label} r{rnd} {name}")
            runs[name].append(run.summary())
    return runs


def _s1_ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    base = runs["base"]
    out: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        out[name] = {key: median([ratio(r[key], b[key]) for r, b in zip(rs, base)])
                     for key in ("tok_per_s", "decode_tok_per_s", "itl_p50_ms", "itl_p99_ms")}
    return out


def _s1_rows(ctx: Bench, configs: dict[str, list[str | None]], ratios: dict[str, dict[str, float]],
             runs: dict[str, list[dict[str, Any]]]) -> None:
    target_name = _target_config(ctx, configs)
    for name in configs:
        if name == "base":
            continue
        r = ratios[name]
        dec, base_dec = (median([x["decode_tok_per_s"] for x in runs[n]]) for n in (name, "base"))
        tput, base_tput = (median([x["tok_per_s"] for x in runs[n]]) for n in (name, "base"))
        tokens, base_tokens = (median([x["tokens"] for x in runs[n]]) for n in (name, "base"))
        info = (f"{dec:.0f} vs base {base_dec:.0f} tok/s; whole run {r['tok_per_s']:.2f}x ({tput:.0f} vs "
                f"{base_tput:.0f} tok/s, {tokens:.0f} vs {base_tokens:.0f} tokens); ITL p50 "
                f"{r['itl_p50_ms']:.2f}x, p99 {r['itl_p99_ms']:.2f}x of base")
        target = THROUGHPUT_TARGET_16 if name == target_name else None
        ctx.rows.append(Row(1, f"decode throughput / base, {name}", r["decode_tok_per_s"], target=target,
                            info=info))


def _target_config(ctx: Bench, configs: dict[str, list[str | None]]) -> str:
    """The ≥0.90 target is about 16 adapters; a quick run applies it to its largest count."""
    lora_counts = [n for n in ctx.cfg.adapter_counts if f"lora x{n}" in configs]
    n = 16 if 16 in lora_counts else max(lora_counts)
    return f"lora x{n}"


def scenario1_half_slots(ctx: Bench) -> None:
    """Scenario 1's target load again on a server holding the adapters in float16 slots
    (LORAPLEX_SLOT_DTYPE=float16, an opt-in), each round paired with that server's own base run.

    Why a second server: the slot dtype is fixed at start-up. Reported beside the default rows, not
    instead of them: the targets are judged on the default (the model's dtype).
    """
    cfg = ctx.cfg
    configs = s1_configs(ctx)
    name = _target_config(ctx, configs)
    ctx.log(f"scenario 1, float16 slots: base vs {name}, {cfg.s1_repeats} interleaved round(s)")
    with spawn(cfg, ctx.store, ctx.work / "server-f16.log", max_batch=cfg.concurrency,
               resident=cfg.max_adapters_needed, env={"LORAPLEX_SLOT_DTYPE": "float16"}) as h:
        wait_for_prefetch(ctx, h)
        ctx.warm_up(h, configs[name])
        runs = _s1_rounds(ctx, h, {"base": configs["base"], name: configs[name]}, "s1 f16")
    r = _s1_ratios(runs)[name]
    dec, base_dec = (median([x["decode_tok_per_s"] for x in runs[n]]) for n in (name, "base"))
    ctx.data["s1_half_slots"] = {"config": name, "runs": runs, "ratios": r}
    ctx.rows.append(Row(1, f"decode throughput / base, {name}, float16 slots (opt-in)", r["decode_tok_per_s"],
                        info=f"{dec:.0f} vs base {base_dec:.0f} tok/s on a server with LORAPLEX_SLOT_DTYPE=float16; "
                             f"ITL p50 {r['itl_p50_ms']:.2f}x, p99 {r['itl_p99_ms']:.2f}x of base"))


def scenario1_defaults(ctx: Bench) -> None:
    """Base vs 16 adapters on a plain `loraplex serve`: no sizing flag or setting at all (the server's
    defaults, e.g. `auto` device slots), each round paired with that server's own base run.

    Why: a new user runs the defaults; the main server's slots are sized by the bench to fit every
    scenario, so its rows say nothing about what the defaults cost (8 slots measured 0.48-0.64x base).
    """
    cfg = ctx.cfg
    n = min(16, len(ctx.lora))
    name = f"lora x{n}"
    configs: dict[str, list[str | None]] = {"base": [None], name: [s.adapter_id for s in ctx.lora[:n]]}
    ctx.log(f"scenario 1, default settings: base vs {name}, {cfg.s1_repeats} interleaved round(s)")
    with spawn(cfg, ctx.store, ctx.work / "server-defaults.log", max_batch=None, resident=None) as h:
        wait_for_prefetch(ctx, h)
        ctx.warm_up(h, configs[name])
        runs = _s1_rounds(ctx, h, configs, "s1 defaults")
    r = _s1_ratios(runs)[name]
    tput, base_tput = (median([x["tok_per_s"] for x in runs[k]]) for k in (name, "base"))
    each = ", ".join(f"{ratio(a['tok_per_s'], b['tok_per_s']):.2f}" for a, b in zip(runs[name], runs["base"]))
    ctx.data["s1_defaults"] = {"config": name, "runs": runs, "ratios": r}
    ctx.rows.append(Row(1, f"throughput / base, {name}, plain `loraplex serve` (defaults)", r["tok_per_s"],
                        target=DEFAULTS_TARGET,
                        info=f"{tput:.0f} vs base {base_tput:.0f} tok/s over HTTP, {cfg.concurrency} concurrent; "
                             f"rounds {each}; decode {r['decode_tok_per_s']:.2f}x, ITL p50 "
                             f"{r['itl_p50_ms']:.2f}x of base"))


def wait_for_prefetch(ctx: Bench, h: ServerHandle) -> None:
    """Let the start-up prefetch finish before measuring: its disk reads would land in the first runs."""
    served = Settings()  # what the server reads from the environment it inherits (process.spawn)
    if served.prefetch_adapters:
        expected = min(len(ctx.lora) + len(ctx.miss) + len(ctx.cold), served.max_adapters_host)
        waited = wait_host_tier(h.base_url, expected)
        ctx.log(f"start-up prefetch: {expected} adapters in host memory {waited:.1f} s after /ready")


# --- scenario 2 -----------------------------------------------------------------------------

def scenario2(ctx: Bench, h: ServerHandle) -> None:
    """loraplex vs PEFT on the same requests, in paired rounds like scenario 1.

    Why rounds: each round runs PEFT's mixed batch, PEFT's naive loop and the
    server back to back (rotated order), and the ratio is taken inside the
    round, so a busy minute on the box hits both sides of a ratio. PEFT runs in
    the bench process while the server is idle between its load runs, so the
    two never compete for the cores.
    """
    cfg = ctx.cfg
    reqs = s2_requests(ctx)
    ctx.log(f"scenario 2: loraplex and PEFT on the same {len(reqs)} requests over {distinct_adapters(reqs)} "
            f"LoRA adapters, {cfg.repeats} interleaved round(s); PEFT naive on the first {cfg.naive_requests}")
    ctx.warm_up(h, [r.adapter_id for r in reqs])
    with pb.peft_with(ctx.bm, ctx.lora[:cfg.peft_adapters]) as model:
        pb.greedy_one(model, ctx.bm, GenRequest(reqs[0].prompt, None, 2))  # warm-up (allocator, kernels)
        rounds = [_s2_round(ctx, h, model, reqs, rnd) for rnd in range(cfg.repeats)]
    lp = median([r["loraplex"].throughput for r in rounds])
    for key, label, target in (("naive", "PEFT naive loop (set_adapter + generate)", NAIVE_TARGET),
                               ("mixed", "PEFT mixed batch (adapter_names=)", MIXED_TARGET)):
        value = median([ratio(r["loraplex"].throughput, r[key].throughput) for r in rounds])
        peft_abs = median([r[key].throughput for r in rounds])
        how = (f"naive timed on the first {cfg.naive_requests} requests" if key == "naive"
               else f"static batches of {cfg.concurrency}")
        ctx.rows.append(Row(2, f"loraplex / {label}", value, target=target,
                            info=f"{lp:.0f} vs {peft_abs:.1f} tok/s ({how}; per-round ratios, median)"))
    first, naive, mixed = rounds[0]["loraplex"].results, rounds[0]["naive"], rounds[0]["mixed"]
    for i, text in enumerate(naive.texts):
        ctx.checks.append(Check("lora_vs_peft", reqs[i].adapter_id, reqs[i].prompt, first[i].text, text))
    agree = sum(a == b for a, b in zip(mixed.texts, naive.texts))
    ctx.data["s2"] = {"rounds": [{"loraplex": r["loraplex"].summary(), "peft_naive": r["naive"].summary(),
                                  "peft_mixed": r["mixed"].summary()} for r in rounds],
                      "loraplex_tok_per_s": lp,
                      "peft_naive_tok_per_s": median([r["naive"].throughput for r in rounds]),
                      "peft_mixed_tok_per_s": median([r["mixed"].throughput for r in rounds]),
                      "peft_mixed_agrees_with_naive": f"{agree}/{len(naive.texts)}"}
    _reference_checks(ctx, h)


def _s2_round(ctx: Bench, h: ServerHandle, model: PeftModel, reqs: list[GenRequest],
              rnd: int) -> dict[str, Any]:
    """One round: the server's load run and both PEFT baselines, in an order rotated per round."""
    cfg = ctx.cfg
    steps: dict[str, Callable[[], Any]] = {
        "loraplex": lambda: ctx.measure(h, reqs, f"s2 r{rnd} loraplex"),
        "mixed": lambda: pb.mixed_batches(model, ctx.bm, reqs, cfg.concurrency),
        "naive": lambda: pb.naive_loop(model, ctx.bm, reqs[:cfg.naive_requests]),
    }
    names = list(steps)
    done = {}
    for name in names[rnd % 3:] + names[:rnd % 3]:
        done[name] = steps[name]()
        if name != "loraplex":
            ctx.log(f"  s2 r{rnd} PEFT {name}: {done[name].summary()}")
    return done


def _reference_checks(ctx: Bench, h: ServerHandle) -> None:
    """The server's greedy text for a MiSS and a base-only request vs PEFT / transformers."""
    if not ctx.references:
        return
    run = ctx.measure(h, [req for _, req, _ in ctx.references], "s2 reference checks")
    for (name, req, ref), res in zip(ctx.references, run.results):
        ctx.checks.append(Check(name, req.adapter_id, req.prompt, res.text, ref))


# --- scenario 5 -----------------------------------------------------------------------------

def _merge_missing(resp: httpx.Response) -> bool:
    """No merge route on this server (404/405, or the adapters router reading '<id>/merge' as an id)."""
    return resp.status_code in (404, 405) or (resp.status_code == 422 and "/merge" in resp.text)


def scenario5(ctx: Bench, h: ServerHandle) -> None:
    cfg = ctx.cfg
    adapter = ctx.lora[0].adapter_id
    resp = httpx.post(f"{h.base_url}/v1/adapters/{adapter}/merge", timeout=300)
    if resp.status_code >= 300 and not _merge_missing(resp):
        ctx.failures.append({"run": "s5 merge", "adapter_id": adapter, "status": resp.status_code,
                             "error": resp.text[:300]})
    if resp.status_code >= 300:
        ctx.log(f"scenario 5: merge not available (POST /v1/adapters/{adapter}/merge → {resp.status_code})")
        ctx.data["s5"] = {"available": False, "status": resp.status_code, "body": resp.text[:300]}
        ctx.rows.append(Row(5, "merged tenant throughput / base", None, target=MERGED_TARGET, available=False,
                            info=f"POST /v1/adapters/{{id}}/merge → {resp.status_code}"))
        return
    ctx.log(f"scenario 5: {adapter} merged; base vs merged, {cfg.s5_repeats} interleaved round(s)")
    try:
        base_reqs = assign([None], cfg.requests_per_run, cfg.new_tokens)
        merged_reqs = assign([adapter], cfg.requests_per_run, cfg.new_tokens)
        ctx.warm_up(h, [adapter])
        pairs = [_pair(ctx, h, base_reqs, merged_reqs, i) for i in range(cfg.s5_repeats)]
    finally:
        httpx.delete(f"{h.base_url}/v1/adapters/{adapter}/merge", timeout=300)
    unmerged = ctx.measure(h, merged_reqs, "s5 unmerged (same requests, un-merged)")
    for m, u in zip(pairs[0][1].results[:2], unmerged.results[:2]):
        ctx.checks.append(Check("merged_vs_unmerged", adapter, m.request.prompt, m.text, u.text))
    value = median([ratio(m.decode_throughput, b.decode_throughput) for b, m in pairs])
    whole = median([ratio(m.throughput, b.throughput) for b, m in pairs])
    b_abs, m_abs = (median([run.decode_throughput for run in runs]) for runs in zip(*pairs))
    m_tokens, b_tokens = pairs[0][1].tokens, pairs[0][0].tokens
    ctx.rows.append(Row(5, "merged tenant decode throughput / base", value, target=MERGED_TARGET,
                        info=f"{m_abs:.0f} vs {b_abs:.0f} tok/s; whole run {whole:.2f}x "
                             f"({m_tokens} vs {b_tokens} tokens)"))
    ctx.rows.append(Row(5, "merged tenant decode throughput / same adapter unmerged",
                        ratio(m_abs, unmerged.decode_throughput),
                        info=f"{m_abs:.0f} vs {unmerged.decode_throughput:.0f} tok/s"))
    ctx.data["s5"] = {"available": True, "adapter": adapter, "unmerged": unmerged.summary(),
                      "runs": [{"base": b.summary(), "merged": m.summary()} for b, m in pairs]}


def _pair(ctx: Bench, h: ServerHandle, base: list[GenRequest], merged: list[GenRequest],
          rnd: int) -> tuple[LoadRun, LoadRun]:
    """(base run, merged run) of one round; the order alternates so neither side always goes second."""
    runs = {"base": base, "merged": merged}
    order = ["base", "merged"] if rnd % 2 == 0 else ["merged", "base"]
    done = {name: ctx.measure(h, runs[name], f"s5 r{rnd} {name}") for name in order}
    return done["base"], done["merged"]

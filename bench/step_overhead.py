"""Micro-benchmark: the adapter layers' cost per engine step, on the real default model.

Why this exists beside the HTTP bench: scenario 1's ratio (adapters vs base
throughput) is decided by the decode step, and an HTTP run is too noisy on a
shared 2-core box to tell a 3 % change from noise. This drives the engine's own
`Runner` (KV cache, flattened tokens, AdapterMapping) directly, with no server,
scheduler or sampling, and interleaves the configurations repetition by
repetition so that load from other processes hits all of them alike.

    python -m bench.step_overhead                  # 1 and 2 threads, default reps
    python -m bench.step_overhead --threads 1 --reps 15 --profile mix16

Every configuration decodes the same 32 sequences at the same positions (one
token each, the cache rows were prefilled once), so only the adapter mapping
differs. Ratios are base step time / config step time (= throughput ratio).

Measured on the shared 2-core AMD EPYC, 1 thread, 5 interleaved reps, median (min),
with the CPU kernel (server/kernels/lora_cpu.c): base 204 ms (197); lora1 0.98 (0.98);
lora4 0.92 (0.92); lora16 0.91 (0.91); lora32 0.83 (0.84); mix16 0.94 (0.93); prefill
lora4 0.87 (0.90). With the torch bmm path instead (LORAPLEX_CPU_KERNELS=false, or
before the kernel): lora16 0.84, lora32 0.79-0.80, mix16 0.81; before the A·xᵀ shrink,
lora16 0.72-0.87 on a busier box. Busy neighbours move these by ±0.1: compare
configurations within one run only.
On the 2-core Intel Xeon (AVX-512, ~14 GB/s one-core streaming; 2026-11-30), 1 thread, 9-11 reps, median,
after the row prefetch and leaner call: base 157 ms; lora1 0.93; lora4 0.90-0.92; lora16 0.81-0.83 (0.80
before); lora32 0.73-0.74; mix16 0.82; lora16_torch 0.71-0.72; float16 slots: lora16_f16 0.83-0.86,
lora32_f16 0.80, mix16_f16 0.86. (mix16 read 0.88 / 0.89 before its slot list was fixed: it reached
only 4 LoRA + 4 MiSS slots. MiSS rides the LoRA slot layout, fold matrix included, so at equal counts it
costs what LoRA does, as over HTTP.) With the base's Linear weights column-major (settings.cpu_column_major, the default since; 7 reps): base
133 ms (152 before: only the GEMM layout changed); lora1 0.91; lora4 0.89; lora16 0.80; lora32 0.71;
mix16 0.80; lora16_f16 0.83; the adapters' ~33 ms per step for 16 did not move, so their ratio to a faster
base fell. Here the base step is faster and memory slower than on the EPYC, so the adapters'
bytes weigh more: 312 MB for 16 adapters take >= 22 ms to read (a 0.88 ceiling at float32).
With 2 threads the box is oversubscribed (base step 2.4-2.7 s) and ratios are noise.
Where the 16-adapter gap comes from (1 thread, all 210 modules' adapter math alone,
cold weights): reading the 312 MB of 16 resident adapters takes 16-24 ms; the kernel
takes 25-28 ms and torch's two bmm per module 27-31 ms when the slots are consecutive,
~60 ms when they are scattered (one bmm pair per slot). bfloat16 weights in the kernel
measured only ~10 % faster (so bytes alone do not bound it), so slots stay in the
model's dtype. `lora16_torch` below is lora16 with the kernel off, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from server.adapters.runtime.backend import TorchBackend
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import AdapterLayers, all_linear_names, inject_adapter_layers, module_table
from server.adapters.weights.loaded import LoadedAdapter
from server.adapters.weights.lora import LoraWeights
from server.adapters.weights.miss import MissWeights
from server.engine.kv_cache import KVCache
from server.engine.runner import Runner
from server.engine.scheduler import StepPlan
from server.model.load import BaseModel, load_base
from server.settings import Settings

RANK = 16
SLOTS = 32


@dataclass
class StepRequest:
    prompt_ids: list[int]


@dataclass(eq=False)
class StepSeq:
    """Just the fields `Runner` reads from an engine Sequence."""

    request: StepRequest
    row: int
    slot: int = -1
    prefilled: int = 0
    generated: int = 1
    last_token: int = 17
    unsent: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def position(self) -> int:
        return self.prompt_len + self.generated - 1


def random_adapter(base: BaseModel, kind: str, seed: int) -> LoadedAdapter:
    """A rank-16 adapter on every linear layer except lm_head (PEFT's all-linear)."""
    gen = torch.Generator().manual_seed(seed)
    table = module_table(base.model)
    names = sorted(all_linear_names(base.model, table))
    modules = {}
    for name in names:
        info = table[name]
        if kind == "lora":
            a = torch.randn(RANK, info.in_features, generator=gen) * 0.02  # [r, in]
            bt = torch.randn(RANK, info.out_features, generator=gen) * 0.02  # [r, out]
            modules[name] = LoraWeights(a.to(base.dtype), bt.to(base.dtype))
        else:
            block = torch.randn(RANK, info.out_features, generator=gen) * 0.01  # [r, out]
            modules[name] = MissWeights(block.to(base.dtype), info.in_features, info.out_features)
    nbytes = sum(w.nbytes for w in modules.values())
    return LoadedAdapter(kind, "default" if kind == "lora" else "balance", RANK, tuple(names), modules, nbytes)


def decode_configs() -> dict[str, list[int]]:
    """Name -> the adapter slot of each of the 32 sequences (-1 = base only)."""
    n = 32
    return {
        "base": [-1] * n,
        "lora1": [0] * n,
        "lora4": [i % 4 for i in range(n)],
        "lora16": [i % 16 for i in range(n)],
        "lora32": list(range(n)),
        "mix16": _mix16(n),  # LoRA 0..7 + MiSS 16..23, alternating
        "lora16_torch": [i % 16 for i in range(n)],  # lora16 with the CPU kernel off: the torch bmm path
        "lora16_f16": [i % 16 for i in range(n)],  # lora16 with float16 slots (settings.slot_dtype)
        "lora32_f16": list(range(n)),
        "mix16_f16": _mix16(n),
    }


def _mix16(n: int) -> list[int]:
    """Sequence i -> LoRA slot (i // 2) % 8 when i is even, MiSS slot 16 + (i // 2) % 8 when odd: 8 + 8 distinct.
    (`i % 8` on the even i alone would reach only four of each.)"""
    return [(16 if i % 2 else 0) + (i // 2) % 8 for i in range(n)]


@contextlib.contextmanager
def torch_path(layers: AdapterLayers, on: bool) -> Iterator[None]:
    """Run with every layer on the pure-torch backend, then put the chosen backends back."""
    backends = {name: layers[name].backend for name in layers.layers}
    if on:
        for name in backends:
            layers[name].backend = TorchBackend()
    try:
        yield
    finally:
        for name, backend in backends.items():
            layers[name].backend = backend


@contextlib.contextmanager
def half_slots(layers: AdapterLayers, on: bool) -> Iterator[None]:
    """Run with every bank's slots converted to float16 (what slot_dtype=float16 holds), then restore."""
    saved = {name: (layer.bank.a, layer.bank.bt) for name, layer in layers.layers.items()}
    if on:
        for name, (a, bt) in saved.items():
            if a is not None and bt is not None:
                layers[name].bank.a, layers[name].bank.bt = a.half(), bt.half()
    try:
        yield
    finally:
        for name, (a, bt) in saved.items():
            layers[name].bank.a, layers[name].bank.bt = a, bt


def load_slots(base: BaseModel, layers: AdapterLayers) -> None:
    """Slots 0..15: LoRA; 16..31: MiSS balance (lora32 uses all, so half of it is MiSS)."""
    for slot in range(SLOTS):
        kind = "miss" if slot >= 16 else "lora"
        layers.load_slot(slot, random_adapter(base, kind, seed=slot))


def time_step(runner: Runner, plan: StepPlan) -> float:
    start = time.perf_counter()
    runner.forward(plan)
    return time.perf_counter() - start


def run(base: BaseModel, runner: Runner, layers: AdapterLayers, reps: int, prompt: int,
        prefill_len: int) -> dict[str, list[float]]:
    seqs = [StepSeq(StepRequest(list(range(100, 100 + prompt))), row=i) for i in range(32)]
    for s in seqs:  # fill the KV rows once (base only): decode then attends over `prompt` positions
        s.generated = 0
        runner.forward(StepPlan(None, [], [(s, prompt)]))
        s.prefilled, s.generated = prompt, 1
    configs = decode_configs()
    prefill_seqs = [StepSeq(StepRequest(list(range(200, 200 + prefill_len))), row=i, generated=0) for i in range(4)]
    times: dict[str, list[float]] = {name: [] for name in configs}
    times["prefill_base"], times["prefill_lora4"] = [], []
    for _ in range(reps):
        for name, slots in configs.items():
            for s, slot in zip(seqs, slots):
                s.slot = slot
            plan = StepPlan(None, list(seqs), [])
            with torch_path(layers, name.endswith("_torch")), half_slots(layers, name.endswith("_f16")):
                times[name].append(time_step(runner, plan))
        for name, slots in (("prefill_base", [-1] * 4), ("prefill_lora4", [0, 1, 2, 3])):
            for s, slot in zip(prefill_seqs, slots):
                s.slot = slot
            times[name].append(time_step(runner, StepPlan(None, [], [(s, prefill_len) for s in prefill_seqs])))
    return times


def report(times: dict[str, list[float]], threads: int) -> None:
    print(f"\n== torch threads: {threads} ==  (median / min ms per step; ratio = base time / time)")
    base_med, base_min = statistics.median(times["base"]), min(times["base"])
    pf_med, pf_min = statistics.median(times["prefill_base"]), min(times["prefill_base"])
    for name, ts in times.items():
        med, lo = statistics.median(ts), min(ts)
        ref_med, ref_min = (pf_med, pf_min) if name.startswith("prefill") else (base_med, base_min)
        print(f"  {name:14s} {med * 1e3:8.1f} {lo * 1e3:8.1f}   ratio med {ref_med / med:5.3f}  min {ref_min / lo:5.3f}")


def profile(runner: Runner, config: str, prompt: int) -> None:
    """torch.profiler table of one config's decode steps (after `run` filled the cache)."""
    seqs = [StepSeq(StepRequest(list(range(100, 100 + prompt))), row=i, slot=slot, prefilled=prompt)
            for i, slot in enumerate(decode_configs()[config])]
    plan = StepPlan(None, seqs, [])
    runner.forward(plan)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            runner.forward(plan)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, run one after another")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--prompt", type=int, default=64, help="positions already in the cache at decode")
    p.add_argument("--prefill", type=int, default=64, help="prompt length of each of the 4 prefill sequences")
    p.add_argument("--profile", default=None, help="a config name to profile with torch.profiler afterwards")
    args = p.parse_args()
    settings = Settings(device="cpu", dtype="float32", max_adapters_resident=SLOTS, max_rank=RANK)
    base = load_base(settings)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    load_slots(base, layers)
    cache = KVCache.for_model(base.model.config, 32, args.prompt + args.prefill + 8, base.device, base.dtype)
    runner = Runner(base, cache)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        report(run(base, runner, layers, args.reps, args.prompt, args.prefill), threads)
        if args.profile:
            profile(runner, args.profile, args.prompt)


if __name__ == "__main__":
    main()

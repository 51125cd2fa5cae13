"""Ops, kernel launches and host↔device copies per decode step, counted by torch.profiler.

Why count instead of time: a small model on a GPU is launch-bound, so the
number of kernels one decode step issues (and how many blocking copies it
waits on) predicts its speed better than a CPU timing does, and the count is
the same on a quiet or a busy machine. On CPU the count of aten ops is the
proxy; on CUDA the kernels themselves are counted.

    python -m bench.launch_count --device cuda --dtype bfloat16 --out launch.json

Drives the engine's own `Runner` the way bench/step_overhead.py does: 32
sequences decode one token each, once with no adapter and once over 16
rank-16 all-linear LoRA adapters in scattered slots (every other slot of a
32-slot bank, neighbouring sequences on different adapters).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.step_overhead import StepRequest, StepSeq, random_adapter
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import AdapterLayers, inject_adapter_layers
from server.engine.kv_cache import KVCache
from server.engine.runner import Runner
from server.engine.scheduler import StepPlan
from server.model.load import BaseModel, load_base
from server.settings import Settings

RANK = 16
SEQS = 32
ADAPTERS = 16
BANK_SLOTS = 2 * ADAPTERS  # adapters sit in every other slot: no two active slots are neighbours
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


@dataclass
class StepOps:
    """Counts per decode step (totals over the profiled steps divided by their number)."""

    aten_ops: float  # every aten:: op the dispatcher ran, nested ones included
    top_ops: float  # aten:: ops called from Python (no aten:: op above them)
    cuda_kernels: float  # kernels that ran on the GPU (0 on CPU)
    launch_calls: float  # cudaLaunchKernel-style runtime calls on the host
    copies: float  # memcpy / memset activities on the GPU
    memcpy_calls: float  # cudaMemcpy* runtime calls on the host
    sync_calls: float  # host waits on the device (stream / device / event synchronize)
    sdpa: dict[str, float]  # backend name -> SDPA calls of that backend per step


def scattered_slots() -> list[int]:
    """Sequence i -> slot 2·(i mod 16): 16 distinct adapters, no two in neighbouring slots or sequences."""
    return [2 * (i % ADAPTERS) for i in range(SEQS)]


def count_events(events: Iterable, steps: int) -> StepOps:
    """Per-step counts from a profiler's `events()` over `steps` identical steps."""
    names: Counter[str] = Counter()
    kernels = copies = top = 0
    for e in events:
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(("Memcpy", "Memset")):
                copies += 1
            else:
                kernels += 1
        else:
            names[e.name] += 1
            top += e.name.startswith("aten::") and not _under_aten(e)
    per = 1.0 / steps
    return StepOps(
        aten_ops=sum(n for name, n in names.items() if name.startswith("aten::")) * per,
        top_ops=top * per,
        cuda_kernels=kernels * per,
        launch_calls=sum(names[n] for n in _LAUNCH_CALLS) * per,
        copies=copies * per,
        memcpy_calls=sum(n for name, n in names.items() if name.startswith("cudaMemcpy")) * per,
        sync_calls=sum(names[n] for n in _SYNC_CALLS) * per,
        sdpa={backend: names[op] * per for op, backend in SDPA_OPS.items() if names[op]},
    )


def _under_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(runner: Runner, plan: StepPlan, device: torch.device, steps: int) -> StepOps:
    """Run `plan` once to warm up, then `steps` times under the profiler; the counts per step."""
    runner.forward(plan)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.forward(plan)
        _sync(device)
    return count_events(prof.events(), steps)


def build(settings: Settings, prompt: int) -> tuple[BaseModel, AdapterLayers, Runner, list[StepSeq]]:
    """The base, 16 LoRA adapters in scattered slots, a KV cache, and 32 sequences prefilled to `prompt`."""
    base = load_base(settings)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    for i, slot in enumerate(sorted(set(scattered_slots()))):
        layers.load_slot(slot, random_adapter(base, "lora", seed=i))
    cache = KVCache.for_model(base.model.config, SEQS, prompt + 16, base.device, base.dtype)
    runner = Runner(base, cache)
    seqs = [StepSeq(StepRequest(list(range(100, 100 + prompt))), row=i, generated=0) for i in range(SEQS)]
    for s in seqs:  # fill each KV row once (base only); decode then attends over `prompt` positions
        runner.forward(StepPlan(None, [], [(s, prompt)]))
        s.prefilled, s.generated = prompt, 1
    return base, layers, runner, seqs


def measure(settings: Settings, prompt: int, steps: int) -> dict:
    """{"base": StepOps, "lora16_scattered": StepOps, ...} for one decode step of 32 sequences."""
    base, layers, runner, seqs = build(settings, prompt)
    out: dict = {"model": base.model_id, "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
                 "sequences": SEQS, "adapters": ADAPTERS, "rank": RANK, "prompt": prompt, "steps": steps,
                 "adapted_modules": len(layers.layers)}
    with torch.inference_mode():
        for name, slots in (("base", [-1] * SEQS), ("lora16_scattered", scattered_slots())):
            for s, slot in zip(seqs, slots):
                s.slot = slot
            out[name] = asdict(profile_steps(runner, StepPlan(None, list(seqs), []), base.device, steps))
    key = "cuda_kernels" if base.device.type == "cuda" else "top_ops"
    extra = out["lora16_scattered"][key] - out["base"][key]
    out["per_adapted_module"] = {"counted": key, "extra_per_step": extra,
                                 "extra_per_module": extra / max(1, len(layers.layers))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.launch_count", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", help="local HF model dir (default: the embedded SmolLM2-135M)")
    p.add_argument("--prompt", type=int, default=64, help="positions in the cache when decoding")
    p.add_argument("--steps", type=int, default=3, help="profiled decode steps per configuration")
    p.add_argument("--out", type=Path, help="write the JSON here (stdout always gets it)")
    a = p.parse_args(argv)
    settings = Settings(model=a.model, device=a.device, dtype=a.dtype, max_adapters_resident=BANK_SLOTS,
                        max_rank=RANK, max_batch=SEQS)
    result = measure(settings, a.prompt, a.steps)
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ops per decode step: the CPU-measurable proxy of how launch-bound a step would be on a GPU.

Why count ops: on a GPU a small model's decode step costs about one kernel
launch per op that does work, whatever the op computes, so a step that issues
thousands of tiny ops is launch-bound long before it is compute- or
memory-bound. Counting them needs no GPU: torch.profiler records every aten op
the step dispatches, here on CPU.

What counts as one op: the innermost aten op that does work (one none of whose
nested aten ops does work: the call that actually runs a kernel). Ops that do
no work are left out: metadata-only ones (views, reshapes, transposes,
slicing, allocation without fill) and no-ops (`to` / `contiguous` / `detach_`
/ `resolve_conj` returning their input; a converting `to` counts through the
`copy_` it runs).
The CPU adapter kernel (server/kernels/lora_cpu.c, called through ctypes, so
invisible to the profiler) counts as one op per call: the bench wraps it in a
`record_function` scope named `KERNEL_SCOPE` and counts those scopes.

The load: 32 decoding sequences (prompt 64 in the cache) over 16 rank-16
all-linear LoRA adapters in scattered device slots (0, 2, 4, ... 30), on the
default model, through the engine's own Runner. Reported: base ops (every
sequence on the base), adapted ops, and (adapted - base) / adapted modules,
for the CPU default path (the C kernel) and for TorchBackend (what a GPU runs
without Triton kernels), the latter also in the static decode layout CUDA runs
(runner.py: padded batch, rows gathered by index, a persistent length mask).
Target: adapted <= base + 2 per adapted module.

On CUDA (`--device cuda`) the rows are the backend injection picks there,
TorchBackend, and the default with `cuda_graphs` (base-only steps replayed), and
a second table counts the kernel and graph launches the CUDA runtime saw.

    python -m bench.step_ops [--top 15] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from bench.report import Row
from bench.step_overhead import RANK, SLOTS, StepRequest, StepSeq, random_adapter, torch_path
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.backend import CpuKernelBackend
from server.adapters.runtime.inject import AdapterLayers, inject_adapter_layers
from server.engine.kv_cache import KVCache
from server.engine.runner import Runner, RunnerOptions
from server.engine.scheduler import StepPlan
from server.kernels.cpu import GroupedLoraKernel
from server.model.load import BaseModel, load_base
from server.settings import Settings

SEQUENCES = 32
ADAPTERS = 16
PROMPT = 64
PER_MODULE_TARGET = 2
KERNEL_SCOPE = "loraplex::lora_cpu_kernel"
# (row name, adapters on the torch path, runner options): CPU's default; what a GPU without Triton runs, in
# CPU's eager decode layout and in CUDA's static (graph-ready) one.
PATHS = (("CPU default (C kernel)", False, RunnerOptions()),
         ("TorchBackend", True, RunnerOptions()),
         ("TorchBackend, static decode layout", True, RunnerOptions(static_decode=True)))
# On CUDA: the backend injection picks, torch's, and the default with base-only steps from CUDA graphs.
CUDA_PATHS = (("default backend", False, RunnerOptions()),
              ("TorchBackend", True, RunnerOptions()),
              ("default backend, cuda_graphs", False, RunnerOptions(cuda_graphs=True)))
# The paths a plain `loraplex serve` runs: the target is theirs; TorchBackend rows are the reference shown beside.
SERVED_PATHS = frozenset({"CPU default (C kernel)", "default backend", "default backend, cuda_graphs"})
# CUDA runtime / driver calls that launch work on the GPU (a graph launch counts one).
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cuGraphLaunch")

# Ops that only change metadata, allocate without writing, or return their input: no kernel launch on a GPU.
NO_WORK_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::t", "aten::transpose", "aten::permute",
    "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::alias", "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::resize_", "aten::unbind", "aten::split", "aten::chunk", "aten::narrow",
    "aten::numpy_T", "aten::contiguous", "aten::_reshape_alias", "aten::result_type", "aten::is_nonzero",
    "aten::new_empty", "aten::new_empty_strided", "aten::view_as",
    "aten::to", "aten::detach_", "aten::resolve_conj", "aten::resolve_neg", "aten::_conj", "aten::_neg_view",
})


def scattered_slots() -> list[int]:
    """Sequence i -> slot 2 * (i % 16): 16 adapters, no two in consecutive slots."""
    return [2 * (i % ADAPTERS) for i in range(SEQUENCES)]


class _ScopedKernel:
    """The C kernel with each call inside a profiler scope, so one call counts as one op."""

    def __init__(self, kernel: GroupedLoraKernel) -> None:
        self._kernel = kernel
        self.weight_dtypes = kernel.weight_dtypes

    def supports(self, *tensors: torch.Tensor) -> bool:
        return self._kernel.supports(*tensors)

    def add(self, *args, **kwargs) -> None:
        with torch.profiler.record_function(KERNEL_SCOPE):
            self._kernel.add(*args, **kwargs)


@contextlib.contextmanager
def scoped_kernels(layers: AdapterLayers) -> Iterator[None]:
    saved = {name: layer.backend for name, layer in layers.layers.items()}
    for name, backend in saved.items():
        if isinstance(backend, CpuKernelBackend):
            scoped = _ScopedKernel(backend.kernel)
            layers[name].backend = CpuKernelBackend(scoped, backend.fallback)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for name, backend in saved.items():
            layers[name].backend = backend


def count_ops(events) -> Counter[str]:
    """Innermost aten ops that do work, plus one per kernel scope (see the module docstring)."""
    counts: Counter[str] = Counter()

    def visit(e) -> int:
        """Ops counted in e's subtree."""
        if e.name == KERNEL_SCOPE:
            counts[e.name] += 1
            return 1
        inner = sum(visit(c) for c in e.cpu_children)
        if inner == 0 and e.name.startswith("aten::") and e.name not in NO_WORK_OPS:
            counts[e.name] += 1
            return 1
        return inner

    for e in events:
        if e.cpu_parent is None:
            visit(e)
    return counts


def count_launches(events) -> int:
    """Kernel launches and graph launches the CUDA runtime saw (CUDA only)."""
    return sum(1 for e in events if e.name.startswith(LAUNCH_CALLS))


def step_ops(runner: Runner, plan: StepPlan) -> tuple[Counter[str], int | None]:
    """(ops by name, CUDA launches or None off CUDA) of one step of `plan`."""
    cuda = runner.device.type == "cuda"
    runner.forward(plan)  # warm: first-call work (and, with cuda_graphs, the capture) is not per-step work
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        runner.forward(plan)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    return count_ops(events), (count_launches(events) if cuda else None)


@dataclass
class OpsRow:
    path: str
    base: int
    adapted: int
    modules: int
    base_launches: int | None = None  # CUDA: kernel and graph launches the runtime saw
    adapted_launches: int | None = None

    @property
    def per_module(self) -> float:
        return (self.adapted - self.base) / self.modules

    @property
    def passed(self) -> bool:
        return self.adapted <= self.base + PER_MODULE_TARGET * self.modules


def measure(top: int = 0, device: str = "cpu", dtype: str = "float32") -> list[OpsRow]:
    settings = Settings(device=device, dtype=dtype,  # type: ignore[arg-type]
                        max_adapters_resident=SLOTS, max_rank=RANK)
    base = load_base(settings)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    slots = scattered_slots()
    for slot in sorted(set(slots)):
        layers.load_slot(slot, random_adapter(base, "lora", seed=slot))
    modules = sum(1 for layer in layers.layers.values() if not layer.bank.empty)
    rows = []
    with scoped_kernels(layers):
        for path, torch_only, options in (PATHS if base.device.type == "cpu" else CUDA_PATHS):
            runner, seqs = _prefilled_runner(base, options)
            plan = StepPlan(None, list(seqs), [])
            with torch_path(layers, torch_only):
                for s in seqs:
                    s.slot = -1
                base_ops, base_launches = step_ops(runner, plan)
                for s, slot in zip(seqs, slots):
                    s.slot = slot
                adapted_ops, adapted_launches = step_ops(runner, plan)
            rows.append(OpsRow(path, base_ops.total(), adapted_ops.total(), modules, base_launches,
                               adapted_launches))
            if top:
                print(f"\n{path}: most frequent ops (base / adapted)")
                for name, n in adapted_ops.most_common(top):
                    print(f"  {name:40s} {base_ops[name]:6d} {n:6d}")
    return rows


def _prefilled_runner(base: BaseModel, options: RunnerOptions) -> tuple[Runner, list[StepSeq]]:
    """A runner whose KV rows hold PROMPT positions of each sequence (filled base only)."""
    cache = KVCache.for_model(base.model.config, SEQUENCES, PROMPT + 8, base.device, base.dtype)
    runner = Runner(base, cache, options)
    seqs = [StepSeq(StepRequest(list(range(100, 100 + PROMPT))), row=i, generated=0) for i in range(SEQUENCES)]
    for s in seqs:
        runner.forward(StepPlan(None, [], [(s, PROMPT)]))
        s.prefilled, s.generated = PROMPT, 1
    return runner, seqs


def table(rows: list[OpsRow]) -> str:
    lines = [f"ops per decode step: {SEQUENCES} sequences over {ADAPTERS} scattered rank-{RANK} all-linear LoRA "
             f"adapters (target: adapted <= base + {PER_MODULE_TARGET} per adapted module)",
             "| path | base ops | adapted ops | adapted modules | (adapted - base) / module | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.path} | {r.base} | {r.adapted} | {r.modules} | {r.per_module:.2f} | "
                     f"{'PASS' if r.passed else 'MISS'} |")
    if any(r.base_launches is not None for r in rows):
        lines += ["", "CUDA launches per decode step (kernels and graphs, torch.profiler):",
                  "| path | base | adapted |", "| --- | --- | --- |"]
        lines += [f"| {r.path} | {r.base_launches} | {r.adapted_launches} |" for r in rows]
    return "\n".join(lines)


def report_rows(device: str, dtype: str) -> tuple[list[Row], list[dict]]:
    """The bench report's rows (scenario 1: what adapters cost a decode step in ops), and their data."""
    rows = measure(0, device, dtype)
    out = [Row(1, f"ops per decode step over base, per adapted module ({r.path})", r.per_module, unit="ops",
               target=PER_MODULE_TARGET if r.path in SERVED_PATHS else None, op="<=",
               info=f"base {r.base} / adapted {r.adapted} ops"
                    + (f" ({r.base_launches} / {r.adapted_launches} CUDA launches)" if r.base_launches else "")
                    + f"; {SEQUENCES} seqs over {ADAPTERS} scattered rank-{RANK} adapters, torch.profiler")
           for r in rows]
    return out, [vars(r) for r in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_ops", description=__doc__.split("\n")[0])
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of each adapted step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(table(measure(a.top, a.device, a.dtype)), flush=True)


if __name__ == "__main__":
    main()

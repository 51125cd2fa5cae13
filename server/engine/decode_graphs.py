"""CUDA graphs of decode steps: one per (batch bucket, key-length bucket), captured on first use.

Why: a small model's decode step on a GPU is a few thousand short kernels, so
launching them costs more than running them. Replaying a captured graph
launches them all at once. It is sound only when everything the forward reads
sits at fixed addresses and every Python decision inside it depends on the key
alone: the runner's static decode layout (step_layout.py) gives fixed shapes
per key, its persistent buffers (step_buffers.py) fixed addresses, and only
base-only steps are captured (an adapter step's plan holds per-step Python
structure: runs of slots, token groups).

Every captured graph shares one memory pool; a reallocation of the step
buffers (their `generation`) drops the graphs, which still read the old ones.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

WARMUP_RUNS = 2  # eager runs on a side stream before capture (lazy initialisation must not be captured)


class DecodeGraphs:
    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"cuda_graphs needs a CUDA device; this model runs on {device.type} "
                             "(turn the setting off)")
        self.device = device
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._generation: int | None = None

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, generation: int, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replay the graph of `key` (capturing `step` first if new); its output tensor, valid until the next run.

        `step` must read only the runner's persistent buffers, so that a replay sees the current step's
        inputs; running it during warm-up and capture is harmless (it writes the same KV entries).
        """
        if generation != self._generation:
            self._graphs.clear()
            self._generation = generation
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(step)
            self._graphs[key] = entry
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work other threads issue meanwhile (adapter uploads, the API's) must not be
        # refused as "capturing", nor captured.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = step()
        return graph, out

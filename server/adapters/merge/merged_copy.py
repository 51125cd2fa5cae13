"""One merged copy of the base for one adapter version: W' = W + ΔW on the modules it adapts.

Why only those modules: every other tensor (and every module the adapter does
not target) is read from the base itself, so a dedicated tenant costs the bytes
of its adapted weights, not a second model. ΔW comes from each kind's own
`delta_weight` (LoRA incl. rsLoRA and rank/alpha patterns, LoRA on embeddings,
MiSS balance/mini, legacy Bone, and bat through the base weight), computed in
float32 and cast once to the serving dtype, so bf16/fp16 serving rounds once
instead of accumulating. A copy with NaN/Inf anywhere is refused (safe merge):
a merged lane has no per-request fallback, so a bad copy must never be served.
Modules the adapter replaces whole (modules_to_save) take its copy as their weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.runtime.inject import AdapterLayers
from server.adapters.weights.loaded import LoadedAdapter, ModuleWeights
from server.adapters.types import AdapterKey
from server.errors import AdapterError


class UnsafeMerge(AdapterError):
    """The merged weights would hold NaN/Inf: refused before anything is published (422)."""


@dataclass(frozen=True, eq=False)
class MergedCopy:
    key: AdapterKey  # the one adapter version these weights belong to
    lane: int  # the AdapterMapping.lane its steps run under; never reused
    weights: dict[str, torch.Tensor]  # module name -> merged weight (serving dtype, the base's layout)

    @property
    def nbytes(self) -> int:
        distinct = {id(w): w for w in self.weights.values()}.values()  # a tied copy serves two modules
        return sum(w.numel() * w.element_size() for w in distinct)


def merged_weight(base: torch.Tensor, weights: ModuleWeights, name: str) -> torch.Tensor:
    """W + ΔW for one module: float32 math, one cast to `base.dtype`, finite or refused."""
    base32 = base.detach().to(torch.float32)  # [out, in] (embedding: [num_embeddings, dim])
    # empty_like keeps the base's strides (column-major on CPU, model/load.py): the merged lane's
    # matmuls then run exactly as fast as the base's.
    merged = torch.empty_like(base).copy_(base32 + weights.delta_weight(base32))
    if not bool(torch.isfinite(merged).all()):
        raise UnsafeMerge(
            f"safe merge refused: merging the adapter into {name} gives NaN/Inf weights in "
            f"{str(base.dtype).removeprefix('torch.')} (adapter values too large for the base); "
            "it stays served unmerged"
        )
    return merged


def build_merged_copy(layers: AdapterLayers, adapter: LoadedAdapter, key: AdapterKey, lane: int) -> MergedCopy:
    """Every module the adapter targets, merged; blocking (run it off the step loop)."""
    missing = [n for n in adapter.modules if n not in layers]
    if missing:
        raise AdapterError(f"adapter targets modules that have no adapter layer: {missing[:3]}")
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, weights in adapter.modules.items():
            out[name] = merged_weight(layers[name].base_layer.weight, weights, name)
        out.update(_saved_weights(layers, adapter))
    return MergedCopy(key, lane, out)


def _saved_weights(layers: AdapterLayers, adapter: LoadedAdapter) -> dict[str, torch.Tensor]:
    """Modules the adapter replaces whole (modules_to_save): the lane reads its copy as the weight, in the
    base's layout; a tied copy stays one tensor for both modules, as in PEFT."""
    missing = [n for n in adapter.saved.weights if n not in layers]
    if missing:
        raise AdapterError(f"adapter replaces modules that have no adapter layer: {missing[:3]}")
    made: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, copy in adapter.saved.weights.items():
        if id(copy) not in made:
            made[id(copy)] = torch.empty_like(layers[name].base_layer.weight).copy_(copy)
        out[name] = made[id(copy)]
    return out


def install(layers: AdapterLayers, copy: MergedCopy) -> None:
    """Make the copy's weights visible to steps that run its lane (engine thread, between steps)."""
    for name, weight in copy.weights.items():
        layers[name].merged_weights[copy.lane] = weight


def uninstall(layers: AdapterLayers, copy: MergedCopy) -> None:
    for name in copy.weights:
        layers[name].merged_weights.pop(copy.lane, None)

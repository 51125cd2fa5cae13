"""A validated adapter in host memory, in compute form, ready to copy into device slots."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Union

import torch

from server.adapters.lora import LoraWeights
from server.adapters.miss import BatWeights, MissWeights

ModuleWeights = Union[LoraWeights, MissWeights, BatWeights]


@dataclass(frozen=True)
class LoadedAdapter:
    kind: str  # lora | miss | bone
    variant: str  # lora: default | rslora; miss/bone: balance | mini | bat
    rank: int  # max over modules
    target_modules: tuple[str, ...]  # sorted base-model module names
    modules: dict[str, ModuleWeights]  # by base-model module name
    nbytes: int  # host tensor bytes

    @property
    def needs_base_weight(self) -> bool:
        """Bat: ΔW depends on W, so unmerged serving costs a full matmul per step."""
        return any(not w.batched for w in self.modules.values())

    def summary(self) -> dict[str, Any]:
        """What the store puts in the adapter record (API.md: type, variant, rank, target_modules)."""
        return {
            "type": self.kind,
            "variant": self.variant,
            "rank": self.rank,
            "target_modules": list(self.target_modules),
            "tensor_bytes": self.nbytes,
        }


def pack_weights(modules: dict[str, ModuleWeights]) -> tuple[dict[str, ModuleWeights], torch.Tensor]:
    """The same weights as views into one owned flat buffer (returned too, `[total elements]`).

    Why: hundreds of small tensors per adapter fragment the host heap (freed
    adapters leave holes a new one does not exactly fit, so RSS outgrows the
    tensor bytes), and a one-shot scan of the buffer replaces a kernel per tensor.
    Freeing the adapter frees the buffer whole. All tensors share the serving dtype.
    """
    tensors = [(name, f.name, getattr(w, f.name)) for name, w in modules.items() for f in fields(w)
               if isinstance(getattr(w, f.name), torch.Tensor)]
    if not tensors:
        return modules, torch.empty(0)
    dtypes = {t.dtype for _, _, t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"adapter tensors must share one dtype to be packed, got {sorted(map(str, dtypes))}")
    flat = torch.empty(sum(t.numel() for _, _, t in tensors), dtype=dtypes.pop())  # [total]
    views: dict[str, dict[str, torch.Tensor]] = {}
    offset = 0
    for name, field, t in tensors:
        view = flat[offset:offset + t.numel()].view(t.shape)
        view.copy_(t)
        views.setdefault(name, {})[field] = view
        offset += t.numel()
    return {name: replace(w, **views.get(name, {})) for name, w in modules.items()}, flat

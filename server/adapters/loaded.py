"""A validated adapter in host memory, in compute form, ready to copy into device slots."""

from __future__ import annotations

import math
from dataclasses import dataclass
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


class Arena:
    """One owned flat buffer an adapter's compute-form tensors are carved from, in order.

    Why: hundreds of small tensors per adapter fragment the host heap (freed
    adapters leave holes a new one does not exactly fit, so RSS outgrows the
    tensor bytes); one allocation per adapter is freed whole, and one pass over
    `flat` checks every value. Loaders write straight into `take(...)` views, so
    no intermediate copy of the adapter exists.
    """

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self.flat = torch.empty(numel, dtype=dtype)  # [numel]
        self._used = 0

    def take(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if self._used + n > self.flat.numel():
            raise ValueError(f"arena of {self.flat.numel()} elements is full")
        view = self.flat[self._used:self._used + n].view(shape)
        self._used += n
        return view

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` cast to the arena's dtype, in the arena."""
        return self.take(*tensor.shape).copy_(tensor)

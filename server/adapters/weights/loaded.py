"""A validated adapter in host memory, in compute form, ready to copy into device slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from server.adapters.weights.lora import LoraWeights
from server.adapters.weights.miss import BatWeights, MissWeights

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
        """What the store puts in the adapter record (API.md: type, variant, rank, target_modules).

        target_modules are PEFT's short names (`q_proj`), as a user wrote them, whoever builds the record.
        """
        return {
            "type": self.kind,
            "variant": self.variant,
            "rank": self.rank,
            "target_modules": sorted({str(m).rsplit(".", 1)[-1] for m in self.target_modules}),
            "tensor_bytes": self.nbytes,
        }


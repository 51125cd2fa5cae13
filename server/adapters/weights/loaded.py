"""A validated adapter in host memory, in compute form, ready to copy into device slots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from server.adapters.weights.lora import LoraWeights
from server.adapters.weights.miss import BatWeights, MissWeights
from server.adapters.weights.saved_modules import SavedModules

ModuleWeights = Union[LoraWeights, MissWeights, BatWeights]


@dataclass(frozen=True)
class LoadedAdapter:
    kind: str  # lora | miss | bone
    variant: str  # lora: default | rslora; miss/bone: balance | mini | bat
    rank: int  # max over modules
    target_modules: tuple[str, ...]  # sorted base-model module names
    modules: dict[str, ModuleWeights]  # by base-model module name
    nbytes: int  # host tensor bytes (saved modules included)
    saved: SavedModules = field(default_factory=SavedModules)  # modules_to_save: whole-module copies

    @property
    def needs_base_weight(self) -> bool:
        """Bat: ΔW depends on W, so unmerged serving costs a full matmul per step."""
        return any(not w.batched for w in self.modules.values())

    def summary(self) -> dict[str, Any]:
        """What the store puts in the adapter record (API.md: type, variant, rank, target_modules, and
        modules_to_save when it has any).

        target_modules are PEFT's short names (`q_proj`), as a user wrote them, whoever builds the record.
        """
        saved = {"modules_to_save": sorted({n.rsplit(".", 1)[-1] for n in self.saved.names()})} if self.saved else {}
        return {
            "type": self.kind,
            "variant": self.variant,
            "rank": self.rank,
            "target_modules": sorted({str(m).rsplit(".", 1)[-1] for m in self.target_modules}),
            "tensor_bytes": self.nbytes,
            **saved,
        }


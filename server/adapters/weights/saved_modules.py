"""Whole-module copies an adapter carries (PEFT's `modules_to_save`): a fine-tuned embedding or head.

PEFT replaces such a module by its own trained copy, so a row of that adapter reads the
copy instead of the base module (no delta: the copy *is* the module). We keep the copy's
weight in the base's dtype, the dtype PEFT loads it into. On a tied base with
`ensure_weight_tying`, PEFT's input embedding and head share one copy: the same tensor
then appears under both names and is counted, and placed on the device, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SavedModules:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> weight [vocab, hidden]

    def __bool__(self) -> bool:
        return bool(self.weights)

    def distinct(self) -> list[torch.Tensor]:
        """Each copy once (a tied copy stands for two modules), in module-name order."""
        seen: dict[int, torch.Tensor] = {}
        for name in sorted(self.weights):
            seen.setdefault(id(self.weights[name]), self.weights[name])
        return list(seen.values())

    @property
    def copies(self) -> int:
        """How many device copy rows the adapter takes."""
        return len(self.distinct())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.distinct())

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))

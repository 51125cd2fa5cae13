"""SlotGroups: a step's adapted tokens grouped by slot, the launch metadata of the Triton kernels.

Kept apart from the kernels (triton_lora.py) so that the step's plan can build it without
importing Triton: on CPU nothing imports Triton at all.

Why group by slot rather than pass one slot per token (BGMV): a group's weights are then read
once per block of its tokens, so a prefill of 2,000 tokens of one adapter streams that adapter's
A and Bᵀ once per 64-token block instead of once per token, and a decode step still needs
nothing but one group per active slot. The three index tensors live in one int32 tensor made
by one host→device copy (pinned, non-blocking on CUDA).

For a captured (CUDA-graph) step the launch grid must not change: the kernels' programs for an
empty group (`starts[g] == starts[g + 1]`) or past a group's tokens return at once, so the groups
may be padded to a fixed count with empty ones and `max_tokens` raised to the step's bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotGroups:
    """Group g is slot `slots[g]` and tokens `tokens[starts[g]:starts[g + 1]]` (int32, the model's device)."""

    tokens: torch.Tensor  # [n] token indices into the step: grouped by slot (ascending), step order inside
    starts: torch.Tensor  # [groups + 1] group boundaries into `tokens`
    slots: torch.Tensor  # [groups] slot of each group
    max_tokens: int  # most tokens any one group has: the kernels' launch grid

    @property
    def count(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def build(cls, runs: Iterable[tuple[int, int, int]], device: torch.device) -> SlotGroups | None:
        """From (slot, start, length) runs of the step (slot < 0: base only, left out); None if none is adapted."""
        by_slot: dict[int, list[int]] = {}
        for slot, start, length in runs:
            if slot >= 0:
                by_slot.setdefault(slot, []).extend(range(start, start + length))
        if not by_slot:
            return None
        slots = sorted(by_slot)
        tokens: list[int] = []
        starts = [0]
        for s in slots:
            tokens.extend(by_slot[s])
            starts.append(len(tokens))
        packed = torch.tensor(tokens + starts + slots, dtype=torch.int32)  # one copy for all three
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        elif packed.device != device:
            packed = packed.to(device)
        n, g = len(tokens), len(slots)
        return cls(packed[:n], packed[n:n + g + 1], packed[n + g + 1:], max(len(v) for v in by_slot.values()))

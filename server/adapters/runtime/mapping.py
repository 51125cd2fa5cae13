"""AdapterMapping: which adapter slot each of a step's tokens uses.

The runner flattens a step's tokens to `[tokens]` (row-major over the
`[batch, seq]` input) and says, per token, which device slot's adapter to add
(-1 = base only). `segments` are the maximal runs of one slot over those
flattened tokens, so a prefill can apply each adapter to a contiguous slice
without gathering. `lane` selects a merged (dedicated) copy of the base
weights for the whole step; such a step has no adapter math at all.

Layers read it through the step's AdapterBatch (plan.py), which the step
context (step.py) carries for the forward's duration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BASE_SLOT = -1  # a token that runs on the base alone: the one value, engine and runtime alike
# Slot id the trainer uses for its trainable adapter (see training/trainer.py).
TRAIN_SLOT = -2


@dataclass(frozen=True)
class Segment:
    slot: int
    start: int  # index into the flattened tokens
    length: int


@dataclass(frozen=True)
class AdapterMapping:
    token_slots: torch.Tensor  # [tokens] int64 on the model's device; -1 = base only
    segments: tuple[Segment, ...]  # runs of equal slot over the flattened tokens
    active_slots: tuple[int, ...] = ()  # distinct slots >= 0 present in this step, sorted
    lane: int | None = None  # run on this merged copy of the base instead
    train: bool = False  # tokens of TRAIN_SLOT use the trainer's trainable parameters

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def has_adapters(self) -> bool:
        return self.lane is None and (bool(self.active_slots) or self.train)

    @classmethod
    def from_row_slots(
        cls,
        row_slots: Sequence[int],
        tokens_per_row: Sequence[int] | int,
        device: torch.device | str = "cpu",
        *,
        lane: int | None = None,
    ) -> "AdapterMapping":
        """Build from one slot per batch row; rows are padded to the same length."""
        n = len(row_slots)
        lengths = [tokens_per_row] * n if isinstance(tokens_per_row, int) else list(tokens_per_row)
        if len(lengths) != n:
            raise ValueError("row_slots and tokens_per_row differ in length")
        width = max(lengths, default=0)
        flat: list[int] = []
        for slot in row_slots:
            flat.extend([slot] * width)
        return cls.from_token_slots(flat, device, lane=lane)

    @classmethod
    def from_token_slots(
        cls, slots: Sequence[int], device: torch.device | str = "cpu", *, lane: int | None = None
    ) -> "AdapterMapping":
        segments: list[Segment] = []
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                segments.append(Segment(int(slots[start]), start, i - start))
                start = i
        active = tuple(sorted({s for s in slots if s >= 0}))
        train = TRAIN_SLOT in slots
        tensor = torch.tensor(list(slots), dtype=torch.long, device=device)
        return cls(tensor, tuple(segments), active, lane=lane, train=train)

    @classmethod
    def base_only(cls, num_tokens: int, device: torch.device | str = "cpu") -> "AdapterMapping":
        return cls.from_token_slots([BASE_SLOT] * num_tokens, device)

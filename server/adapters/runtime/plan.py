"""AdapterBatch: the step's adapter plan, built once from the AdapterMapping before the forward.

Long runs of one adapter (prefill) are served per segment: a slice of x times
that slot's A and Bᵀ, no gather. Short runs (decode: one token per sequence) are
served together with no Python loop over adapters: x's rows are gathered into a
`[slots, t_max, in]` layout (row j of block b = the j-th short token of the b-th
active slot; padding rows repeat a real token and are never read back), one
`bmm` with A and one with Bᵀ run over all slots at once, and the rows are
gathered back. Gathering x (tokens × in) instead of weights per token
(tokens × r × in) is what makes it cheap. The blocks are compact (one per
*active* slot) and each run of consecutive active slots is one bmm on a slice of
the slot tensors, so idle slots between active ones cost nothing. When the
step's tokens already are in that layout (one adapter, or tokens sorted by slot
with equal counts) both gathers are skipped.

On CPU in float32 the short runs go to a C kernel instead (server/kernels/lora_cpu.c,
through `Grouped.blocks`: each active slot and its tokens): it reads every slot's
weights in place, so scattered slots cost no extra call, and the bmm layout above
stays as the GPU path and the reference the kernel is tested against.

On CUDA the Triton kernels (server/kernels/triton_lora.py) serve long and short runs alike from
`groups` (every adapted token grouped by slot, int32): built here, once per step, in one
host→device copy, so no layer builds an index tensor.

Decode with many distinct adapters is bound by reading every active adapter's
weights once per step, so this layout was chosen over the alternatives for the
fewest bytes and calls (measurements: bench/NOTES.md, "Grouped decode layout").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.adapters.runtime.mapping import TRAIN_SLOT, AdapterMapping
from server.kernels.cpu import Blocks
from server.kernels.groups import SlotGroups

# Runs at least this long are served per segment (prefill); shorter ones go through the grouped bmm.
LONG_RUN = 8


@dataclass
class Grouped:
    """The short-run tokens, laid out by slot for one grouped bmm."""

    tokens: torch.Tensor  # [n] token indices into the flattened step
    positions: torch.Tensor  # [n] row in the [slots * t_max] layout
    slots: torch.Tensor  # [n] slot of each token
    source: torch.Tensor  # [slots * t_max] token index of each layout row (padding: a real token)
    num_slots: int  # compact blocks: one per distinct active slot
    t_max: int  # most short tokens any one slot has
    runs: tuple[tuple[int, int, int], ...]  # (first slot, slot count, first block): consecutive active slots
    all_tokens: bool  # tokens == arange(num_tokens): y takes the rows with `+=`, no index_add
    identity: bool  # the layout *is* the step's token order: no gather of x, no gather of the output
    blocks: Blocks | None  # the same grouping for the CPU kernel (slot per block, its tokens); None off CPU


@dataclass(frozen=True)
class AdapterBatch:
    """What every adapter layer of one forward reads: built whole, eagerly, by `build`."""

    num_tokens: int
    lane: int | None  # run on this merged copy of the base instead (no adapter math)
    train: bool  # tokens of TRAIN_SLOT use the trainer's trainable parameters
    active: frozenset[int]  # slots present (TRAIN_SLOT included when train)
    long: tuple[tuple[int, int, int], ...]  # (slot, start, length)
    grouped: Grouped | None
    slot_rows: dict[int, torch.Tensor]  # [k] token indices of each active slot (bat, training rows)
    mapping: AdapterMapping
    groups: SlotGroups | None = None  # every adapted token grouped by slot: the Triton kernels' launch

    @property
    def has_adapters(self) -> bool:
        return self.lane is None and bool(self.active)

    def rows(self, slot: int) -> torch.Tensor:
        """Token indices `[k]` of one active slot."""
        return self.slot_rows[slot]

    @classmethod
    def build(cls, mapping: AdapterMapping) -> AdapterBatch:
        device = mapping.token_slots.device
        active = frozenset(mapping.active_slots) | (frozenset([TRAIN_SLOT]) if mapping.train else frozenset())
        if not mapping.has_adapters:
            return cls(mapping.num_tokens, mapping.lane, mapping.train, active, (), None, {}, mapping)
        long: list[tuple[int, int, int]] = []
        short_tokens: list[int] = []
        short_slots: list[int] = []
        rows: dict[int, list[int]] = {}
        for seg in mapping.segments:
            if seg.slot in active:
                rows.setdefault(seg.slot, []).extend(range(seg.start, seg.start + seg.length))
            if seg.slot < 0:
                continue
            if seg.length >= LONG_RUN:
                long.append((seg.slot, seg.start, seg.length))
            else:
                short_tokens.extend(range(seg.start, seg.start + seg.length))
                short_slots.extend([seg.slot] * seg.length)
        grouped = _group_short_runs(short_tokens, short_slots, mapping.num_tokens, device) if short_tokens else None
        slot_rows = {s: torch.tensor(r, dtype=torch.long, device=device) for s, r in rows.items()}
        groups = SlotGroups.build(((seg.slot, seg.start, seg.length) for seg in mapping.segments), device)
        return cls(mapping.num_tokens, mapping.lane, mapping.train, active, tuple(long), grouped, slot_rows,
                   mapping, groups)


def _group_short_runs(tokens: list[int], slots: list[int], num_tokens: int, device: torch.device) -> Grouped:
    """Buffer blocks are compact (block b = the b-th active slot), so empty slots between
    active ones are never multiplied: their zero weights would still cost memory traffic."""
    counts: dict[int, int] = {}
    order: list[int] = []
    for s in slots:
        order.append(counts.get(s, 0))
        counts[s] = order[-1] + 1
    t_max = max(counts.values())
    block = {s: b for b, s in enumerate(sorted(counts))}
    positions = [block[s] * t_max + j for s, j in zip(slots, order)]
    source = [tokens[0]] * (len(counts) * t_max)
    for token, position in zip(tokens, positions):
        source[position] = token
    all_tokens = len(tokens) == num_tokens  # segments are ordered, so then tokens == arange
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Grouped(
        tokens=as_tensor(tokens),
        positions=as_tensor(positions),
        slots=as_tensor(slots),
        source=as_tensor(source),
        num_slots=len(counts),
        t_max=t_max,
        runs=_slot_runs(sorted(counts)),
        all_tokens=all_tokens,
        identity=all_tokens and source == list(range(num_tokens)),
        blocks=_blocks(tokens, slots, counts) if device.type == "cpu" else None,
    )


def _blocks(tokens: list[int], slots: list[int], counts: dict[int, int]) -> Blocks:
    """Tokens ordered by slot (stable), one block per active slot, in slot order."""
    active = sorted(counts)
    starts = [0]
    for s in active:
        starts.append(starts[-1] + counts[s])
    ordered = [t for _, t in sorted(zip(slots, tokens), key=lambda st: st[0])]
    return Blocks.build(active, starts, ordered)


def _slot_runs(active: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs of consecutive slots: one bmm per run on a slice of the slot tensors
    (a gather of weights would copy them, doubling the traffic that bounds decode)."""
    runs: list[tuple[int, int, int]] = []
    for b, s in enumerate(active):
        if runs and runs[-1][0] + runs[-1][1] == s:
            first, count, block = runs[-1]
            runs[-1] = (first, count + 1, block)
        else:
            runs.append((s, 1, b))
    return tuple(runs)

"""How many device slots each adapted module gets: `max_adapters_resident`, `auto` resolved.

Why `auto` is a full batch: with fewer slots than `max_batch`, a batch of distinct
adapters cannot run at once; requests wait for slots and slots thrash (measured
0.48–0.64× base throughput at 8 slots against 0.70× at 32, on one CPU load of 32
requests over 16 adapters). Slot tensors are allocated lazily (slots.py: a bank
exists once an adapter targets its module, and grows its rank capacity with the
adapters), so the default costs nothing until adapters arrive.

On a GPU the slots share device memory with the model and the KV cache, so `auto`
is also capped: the slots of every adaptable module, at the largest rank an
adapter may have (`max_rank`, what the lazy banks can grow to), must fit in
`slot_memory_fraction` of the memory free after the base model and KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from server.adapters.runtime.inject import module_table

AUTO = "auto"
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class SlotPlan:
    """The resolved slot count and what it may cost, for the start-up log."""

    slots: int
    requested: int | str  # the setting: an integer, or "auto"
    max_batch: int
    max_rank: int
    bytes_per_slot_rank: int  # one slot's bytes per rank across every adaptable module
    budget_bytes: int | None  # auto on a GPU: the memory slots may take; None = no cap (CPU, explicit)

    @property
    def max_bytes(self) -> int:
        """Bytes of all slots once adapters of rank `max_rank` fill every adaptable module."""
        return self.slots * self.bytes_per_slot_rank * self.max_rank

    def describe(self) -> str:
        how = (f"auto: a full batch (max_batch {self.max_batch})" if self.requested == AUTO
               else f"--max-adapters-resident {self.requested}")
        if self.budget_bytes is not None:
            how += (f", capped by a device budget of {self.budget_bytes / GiB:.2f} GiB "
                    f"({self.budget_bytes // max(1, self.bytes_per_slot_rank * self.max_rank)} slots fit)")
        return (f"adapter device slots: {self.slots} per adapted module ({how}); allocated as adapters "
                f"arrive (0 B now): {self.bytes_per_slot_rank * 8 / MiB:.1f} MiB per slot per 8 ranks, "
                f"at most {self.max_bytes / GiB:.2f} GiB at r_cap {self.max_rank} (max_rank)")


def bytes_per_slot_rank(model: nn.Module, element_size: int) -> int:
    """One slot's bytes per unit of rank over every module inject_adapter_layers wraps (each Linear and
    the input embedding): A's row and Bᵀ's row."""
    embed = model.get_input_embeddings()
    table = module_table(model)
    embed_names = {n for n, m in model.named_modules() if m is embed}
    features = sum(info.in_features + info.out_features for name, info in table.items()
                   if info.kind == "linear" or (info.kind == "embedding" and name in embed_names))
    return features * element_size


def plan_slots(requested: int | str, *, max_batch: int, max_rank: int, bytes_per_rank: int,
               free_device_bytes: int | None, reserved_bytes: int, fraction: float) -> SlotPlan:
    """Resolve the setting. `free_device_bytes`: the accelerator's free memory after the base model
    (None on CPU: nothing to cap); `reserved_bytes`: memory still to be taken before serving (KV cache)."""
    if requested != AUTO:
        if not isinstance(requested, int) or requested < 1:
            raise ValueError(f"max_adapters_resident must be a positive integer or 'auto', not {requested!r}")
        return SlotPlan(requested, requested, max_batch, max_rank, bytes_per_rank, None)
    if free_device_bytes is None:
        return SlotPlan(max_batch, AUTO, max_batch, max_rank, bytes_per_rank, None)
    budget = max(0, int((free_device_bytes - reserved_bytes) * fraction))
    fit = budget // max(1, bytes_per_rank * max_rank)
    return SlotPlan(max(1, min(max_batch, fit)), AUTO, max_batch, max_rank, bytes_per_rank, budget)

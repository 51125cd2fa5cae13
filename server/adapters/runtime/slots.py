"""Per-module device slots: every resident adapter's factors, stacked.

`a` is `[slots, r_cap, in]` (embedding: `[slots, num_embeddings, r_cap]`, so a
token's row is one gather) and `bt` is `[slots, r_cap, out]`: B is kept
transposed (Bᵀ, scale folded in) because `bmm(h, Bᵀ)` reads a contiguous
`[r, out]` operand much faster on CPU than a transposed `[out, r]` view
(bench/NOTES.md, "Slot banks"). Ranks are zero-padded, so any mix of ranks and kinds (LoRA, MiSS
balance/mini) multiplies as one tensor. Their dtype is `settings.slot_dtype`
(default: the model's); float16 slots on a float32 model are read by the CPU
kernel at half the bytes, and the torch paths widen them per use.

Allocation is lazy (a module no adapter targets costs nothing) and the rank
capacity `r_cap` grows in steps of 8 up to `settings.max_rank` only when an
adapter needs it: sizing every module for the maximum rank up front would cost
4× the memory and the compute at the default max rank 64 for typical rank-16
adapters. Compute slices to `r_used`, the largest rank resident here.

Only the engine thread issues slot writes, and only between steps; on a GPU they
run asynchronously on a side stream (transfer.py says which orderings keep them
safe), `stage` giving each host source's device copy. Growing a bank
allocates and zeroes `[slots, r_cap, in]` + `[slots, r_cap, out]` for every
module an adapter targets (1.25 GB for 64 slots of SmolLM2 at rank 16): done on
the engine thread, every running stream would stall for it (bench/NOTES.md,
"Slot banks"). So a request's prepare reserves the grown
tensors on a loader thread (`reserve`) and the engine thread only swaps them in.

DoRA slots also keep their column rescale `g − 1` (weights/lora.py) in `dora`,
`[slots + 2, out]` float32, allocated with the first DoRA adapter: rows of other
slots are zero, and so are the two last rows, so the step's token slots (BASE_SLOT
-1, TRAIN_SLOT -2 included) index it directly (runtime/dora.py applies it).
"""

from __future__ import annotations

import threading

import torch

from server.adapters.runtime.transfer import Stage
from server.adapters.weights.loaded import ModuleWeights
from server.adapters.weights.lora import LoraWeights


def _round_up(n: int, step: int = 8) -> int:
    return -(-n // step) * step


class SlotBank:
    def __init__(self, num_slots: int, in_features: int, out_features: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, embedding: bool = False,
                 slot_dtype: torch.dtype | None = None) -> None:
        self.num_slots = num_slots
        self.in_features = in_features  # embedding: num_embeddings
        self.out_features = out_features  # embedding: embedding_dim
        self.max_rank = max_rank
        self.device, self.dtype, self.embedding = device, dtype, embedding  # dtype: the model's (bat blocks)
        self.slot_dtype = slot_dtype or dtype  # a / bt
        self.a: torch.Tensor | None = None  # [slots, r_cap, in] | embedding [slots, num_emb, r_cap]
        self.bt: torch.Tensor | None = None  # [slots, r_cap, out]
        self.ranks = [0] * num_slots  # 0 = nothing batched in this slot
        self.weights: list[ModuleWeights | None] = [None] * num_slots  # host copies (reference, merge)
        self.bat: dict[int, torch.Tensor] = {}  # slot -> bat block [out/r, r, r] on device
        self.r_used = 0
        self.dora: torch.Tensor | None = None  # [slots + 2, out] float32 g − 1; zero rows for non-DoRA slots
        self.dora_slots: set[int] = set()  # slots whose row of `dora` is set
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # zeroed (a, bt) of a larger r_cap
        self._grow_lock = threading.Lock()  # loader threads' reservations vs the engine thread's swap

    @property
    def r_cap(self) -> int:
        return 0 if self.bt is None else int(self.bt.shape[1])

    @property
    def empty(self) -> bool:
        return self.r_used == 0 and not self.bat

    def write(self, slot: int, weights: ModuleWeights, stage: Stage = lambda t: t) -> None:
        """Put `weights` in `slot`, replacing whatever it held: the new rows are copied over the old
        ones and only the old rows past the new rank are zeroed (a reload writes each byte once).
        `stage` maps a host tensor to the copy of it the device reads (transfer.SlotCopier)."""
        old_rank = self.ranks[slot]
        self.bat.pop(slot, None)
        self.weights[slot] = weights
        self._write_dora(slot, weights.dora_scale if isinstance(weights, LoraWeights) else None, stage)
        if not weights.batched:
            self._zero_rows(slot, 0, old_rank)
            self._set_rank(slot, 0)
            self.bat[slot] = stage(weights.block).to(self.device, self.dtype)  # type: ignore[attr-defined]
            return
        a, bt = (stage(t) for t in weights.factors())  # [r, in], [r, out]
        r = int(a.shape[0])
        self.grow(r)
        assert self.a is not None and self.bt is not None
        if self.embedding:
            self.a[slot, :, :r].copy_(a.T)
        else:
            self.a[slot, :r].copy_(a)
        self.bt[slot, :r].copy_(bt)
        self._zero_rows(slot, r, old_rank)
        self._set_rank(slot, r)

    def _write_dora(self, slot: int, scale: torch.Tensor | None, stage: Stage) -> None:
        """The slot's row of `dora`: g − 1 for a DoRA module, zero (or nothing to do) otherwise."""
        if scale is None:
            if slot in self.dora_slots:
                assert self.dora is not None
                self.dora[slot].zero_()
                self.dora_slots.discard(slot)
            return
        if self.dora is None:
            self.dora = torch.zeros(self.num_slots + 2, self.out_features, device=self.device, dtype=torch.float32)
        self.dora[slot].copy_(stage(scale)).sub_(1)
        self.dora_slots.add(slot)

    def clear(self, slot: int) -> None:
        self._write_dora(slot, None, lambda t: t)
        self._zero_rows(slot, 0, self.ranks[slot])
        self._set_rank(slot, 0)
        self.bat.pop(slot, None)
        self.weights[slot] = None

    def _zero_rows(self, slot: int, start: int, stop: int) -> None:
        """Rows [start, stop) of a slot back to zero. Rows at or past a slot's rank are always zero:
        every step reads `r_used` rows of each active slot, so a shorter adapter must see zeros there."""
        if stop <= start:
            return
        assert self.a is not None and self.bt is not None
        if self.embedding:
            self.a[slot, :, start:stop].zero_()
        else:
            self.a[slot, start:stop].zero_()
        self.bt[slot, start:stop].zero_()

    def _set_rank(self, slot: int, rank: int) -> None:
        self.ranks[slot] = rank
        self.r_used = max(self.ranks)

    def needs(self, rank: int) -> bool:
        """Whether a write of `rank` would have to allocate (neither the tensors nor a reservation hold it)."""
        return rank > max(self.r_cap, _cap_of(self._pending))

    def reserve(self, rank: int) -> None:
        """Any thread: allocate the zeroed tensors a write of `rank` will need, if it needs larger ones."""
        with self._grow_lock:
            if self.needs(rank):
                pending = self._zeros(self._cap_for(rank))
                if self.device.type == "cuda":  # zeroed on this thread's stream: done before the engine's sees it
                    torch.cuda.current_stream(self.device).synchronize()
                self._pending = pending

    def _cap_for(self, rank: int) -> int:
        return max(rank, min(_round_up(rank), self.max_rank))

    def _zeros(self, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        a_shape = (self.num_slots, self.in_features, cap) if self.embedding else (self.num_slots, cap, self.in_features)
        a = torch.zeros(a_shape, device=self.device, dtype=self.slot_dtype)
        bt = torch.zeros(self.num_slots, cap, self.out_features, device=self.device, dtype=self.slot_dtype)
        return a, bt

    def grow(self, rank: int) -> None:
        """Engine thread: grow to hold `rank`, from the reservation when it is large enough.

        Under the lock, so a reservation never outlives a growth that made it useless (it would hold
        a bank's worth of memory); a reservation being allocated right now is waited for and used."""
        if rank <= self.r_cap:
            return
        with self._grow_lock:
            pending, self._pending = self._pending, None
            a, bt = pending if pending is not None and rank <= _cap_of(pending) else self._zeros(self._cap_for(rank))
            old = self.r_cap
            if old:
                assert self.a is not None and self.bt is not None
                if self.embedding:
                    a[:, :, :old].copy_(self.a)
                else:
                    a[:, :old].copy_(self.a)
                bt[:, :old].copy_(self.bt)
            self.a, self.bt = a, bt

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.bt, self.dora) if t is not None)


def _cap_of(tensors: tuple[torch.Tensor, torch.Tensor] | None) -> int:
    return 0 if tensors is None else int(tensors[1].shape[1])  # bt: [slots, r_cap, out]

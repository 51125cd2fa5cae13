"""Adapter-aware Linear / Embedding wrappers, injected in place of the base modules.

The wrapper sits at the base module's path and keeps it as `.base_layer`
(PEFT's layout), so PEFT's keys map one-to-one and tied weights stay tied. Each
forward reads the step's AdapterBatch (from the StepContext, step.py):
  - no batch / no adapters       → the base module, untouched;
  - `lane` set                   → this module's merged weight for that lane, no adapter math;
  - otherwise                    → base output + every token's own adapter term
    (computed by the module's AdapterBackend, backend.py; `plan.py` explains the batched
    layout), + bat's full ΔW per bat adapter present,
    + the trainer's trainable adapter on TRAIN_SLOT rows;
    then, on the input embedding and the head, the rows of adapters that replace the whole
    module (modules_to_save) take their copy's output instead (module_copies.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.adapters.runtime.backend import AdapterBackend
from server.adapters.runtime.mapping import TRAIN_SLOT
from server.adapters.runtime.module_copies import ModuleCopyPool
from server.adapters.weights.miss import bat_delta
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.slots import SlotBank
from server.adapters.runtime.step import current_step
from server.model.quantize import dense_weight


class AdaptedModule(nn.Module):
    """What Linear and Embedding wrappers share: slots, seams, dispatch."""

    def __init__(self, base_layer: nn.Module, name: str, bank: SlotBank, backend: AdapterBackend) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.bank = bank
        self.backend = backend  # how the slot terms are computed (backend.py)
        self.merged_weights: dict[int, torch.Tensor] = {}  # merge path: lane -> full weight
        self.train_adapter: nn.Module | None = None  # trainer hook: called on TRAIN_SLOT rows
        self.copies: ModuleCopyPool | None = None  # whole-module copies (input embedding and head only)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._forward_slots(x)
        if self.copies is None:  # every module but the input embedding and the head
            return y
        step = current_step()
        batch = None if step is None else step.adapters
        if batch is None or not self.copies.active(self.module_name, batch):
            return y
        return self._with_copies(x, y, batch)

    def _forward_slots(self, x: torch.Tensor) -> torch.Tensor:
        step = current_step()
        batch = None if step is None else step.adapters
        if batch is None:
            return self.base_layer(x)
        if batch.lane is not None:
            merged = self.merged_weights.get(batch.lane)
            return self.base_layer(x) if merged is None else self._with_weight(x, merged)
        if not batch.has_adapters or (self.bank.empty and not (batch.train and self.train_adapter)):
            return self.base_layer(x)
        y = self.base_layer(x)
        x2 = self._flat_input(x)
        y2 = y.view(-1, y.shape[-1])  # [tokens, out]
        if y2.shape[0] != batch.num_tokens:
            raise RuntimeError(
                f"{self.module_name}: forward has {y2.shape[0]} tokens but the AdapterMapping has {batch.num_tokens}"
            )
        if not self.bank.empty:
            self._add_adapters_once_rounded(x2, y2, batch)
        if batch.train and self.train_adapter is not None:
            y2 = self._add_trainable(x2, y2, batch)
        return y2.view(y.shape)

    def _add_adapters_once_rounded(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        """`y += Σ adapter terms`, accumulated in float32 and rounded once to a 16-bit model's dtype.

        Why: in bfloat16 the shrink `x·Aᵀ`, the expand and the add would each round (three roundings of
        a small term onto a large one); widening the step's activations costs two casts per module.
        A float32 model adds in place, as before, and so does a backend that rounds once itself
        (`rounds_once`: the Triton kernels load y, add in float32 and store it rounded).
        """
        if y2.dtype == torch.float32 or self._rounds_in_place(batch):
            self._add_adapters(x2, y2, batch)
            return
        acc = y2.float()  # [tokens, out]
        self._add_adapters(x2 if not x2.is_floating_point() else x2.float(), acc, batch)
        y2.copy_(acc)

    def _rounds_in_place(self, batch: AdapterBatch) -> bool:
        """Whether every term this module adds is rounded once by the backend itself (no widening here)."""
        return False

    def _add_trainable(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """`y += train_adapter(x)` on TRAIN_SLOT rows, out of place so autograd sees it."""
        assert self.train_adapter is not None
        rows = batch.rows(TRAIN_SLOT)  # [k]
        if rows.numel() == batch.num_tokens:
            return y2 + self.train_adapter(x2)
        return y2.index_add(0, rows, self.train_adapter(x2.index_select(0, rows)))

    # -- per-kind pieces ---------------------------------------------------
    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _add_adapters(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        raise NotImplementedError

    def _with_copies(self, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """`y` with the rows of slots that replace this whole module read from their copies (module_copies.py)."""
        raise NotImplementedError


class AdaptedLinear(AdaptedModule):
    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])  # [tokens, in]

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _rounds_in_place(self, batch: AdapterBatch) -> bool:
        """The backend rounds once itself and no bat block (a torch matmul of its own) adds here this step."""
        return self.backend.rounds_once and not any(slot in batch.active for slot in self.bank.bat)

    def _add_adapters(self, x2: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        self.backend.add_linear(x2, y2, self.bank, batch, self.base_layer.bias)
        for slot, block in self.bank.bat.items():
            if slot in batch.active:
                rows = batch.rows(slot)  # [k]
                weight = dense_weight(self.base_layer.weight)  # a quantized base: dequantized for this step
                delta = bat_delta(weight, block, x2.dtype)  # [out, in]: the full extra matmul
                y2.index_add_(0, rows, x2.index_select(0, rows) @ delta.T)

    def _with_copies(self, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        assert self.copies is not None
        return self.copies.head(self.module_name, x, y, batch)


class AdaptedEmbedding(AdaptedModule):
    """Input embedding; LoRA only: Δ = emb(ids, Aᵀ) · (B·s)ᵀ. The trainer's module receives ids."""

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)  # [tokens] ids

    def _with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, weight, self.base_layer.padding_idx)

    def _add_adapters(self, ids: torch.Tensor, y2: torch.Tensor, batch: AdapterBatch) -> None:
        self.backend.add_embedding(ids, y2, self.bank, batch)

    def _with_copies(self, x: torch.Tensor, y: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        assert self.copies is not None
        return self.copies.embed(self.module_name, x, y, batch)

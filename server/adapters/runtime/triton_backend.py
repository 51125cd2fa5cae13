"""TritonBackend: the slot term on CUDA through the Triton kernels, two launches per module.

Why its own backend: on a GPU the torch path costs a bmm pair per run of consecutive slots,
per module, plus index gathers (thousands of launches per decode step); the kernels
(server/kernels/triton_lora.py) read every active slot's weights in place from the step's
SlotGroups, for decode and prefill alike. It adds into a 16-bit `y` in float32 and rounds once
itself, so the layer skips its widened copy of y (`rounds_once`). Embeddings, autograd and
whatever the kernels do not take go to a TorchBackend, which stays the reference.

Importing this module imports Triton: inject.py does it only for a model on CUDA.
"""

from __future__ import annotations

import torch

from server.adapters.runtime.backend import TorchBackend
from server.adapters.runtime.dora import rescale_dora
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.slots import SlotBank
from server.kernels import triton_lora


class TritonBackend:
    rounds_once = True  # add_linear adds a 16-bit y's term in float32 and rounds once itself

    def __init__(self, fallback: TorchBackend | None = None) -> None:
        self.fallback = fallback or TorchBackend()

    def add_linear(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch,
                   bias: torch.Tensor | None = None) -> None:
        if batch.groups is None or not bank.r_used:
            return
        assert bank.a is not None and bank.bt is not None
        if self._takes(x2, y2, bank):
            triton_lora.add_lora(x2, y2, bank.a, bank.bt, batch.groups, bank.r_used)
            rescale_dora(y2, bias, bank, batch)  # torch ops after the kernels, in float32
        else:
            self._torch_once_rounded(x2, y2, bank, batch, bias)

    def add_embedding(self, ids: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch) -> None:
        self.fallback.add_embedding(ids, y2, bank, batch)

    def _takes(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank) -> bool:
        """The one place that decides whether the kernels run: no autograd (they write in place,
        unseen), tensors of a device and dtype they run on."""
        assert bank.a is not None and bank.bt is not None
        return not x2.requires_grad and not y2.requires_grad and triton_lora.supports(x2, y2, bank.a, bank.bt)

    def _torch_once_rounded(self, x2: torch.Tensor, y2: torch.Tensor, bank: SlotBank, batch: AdapterBatch,
                            bias: torch.Tensor | None) -> None:
        """The torch path with the layer's float32 accumulation, which `rounds_once` told it to skip."""
        if y2.dtype == torch.float32:
            self.fallback.add_linear(x2, y2, bank, batch, bias)
            return
        acc = y2.float()  # [tokens, out]
        self.fallback.add_linear(x2.float(), acc, bank, batch, bias)
        y2.copy_(acc)

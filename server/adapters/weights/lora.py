"""LoRA weights of one module, held in compute form.

PEFT computes `y += (x @ Aᵀ @ Bᵀ) · s`; we fold `s` into B once at load time and
keep `Bᵀ` (`[r, out]`), which is the layout the batched path multiplies by, so a
load is a plain copy into a device slot and serving never rescales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha/r, or alpha/sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraWeights:
    """`a` is `[r, in]` (embedding: `[r, num_embeddings]`); `bt` is `(B·s)ᵀ`, `[r, out]`."""

    a: torch.Tensor  # [r, in]
    bt: torch.Tensor  # [r, out], scale folded in
    embedding: bool = False
    batched: bool = True  # served by the stacked (A, Bᵀ) slot path

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.bt.numel() * self.bt.element_size()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A `[r, in]`, Bᵀ `[r, out]`) for the slot tensors."""
        return self.a, self.bt

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW in the base weight's layout: Linear `[out, in]`, Embedding `[num_embeddings, dim]`."""
        a = self.a.to(base_weight.device, torch.float32)
        bt = self.bt.to(base_weight.device, torch.float32)
        delta = a.T @ bt if self.embedding else bt.T @ a
        return delta.to(base_weight.dtype)


def write_scaled_bt(b: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out `[..., r, out]` = (B `[..., out, r]` · scale)ᵀ from PEFT's `lora_B.weight` (or `lora_embedding_B`):
    B is scaled in float32, and only then narrowed when `out` is a 16-bit dtype (the loader, carve.py,
    writes a whole role of a file at once with it)."""
    bt = b.transpose(-1, -2)
    if out.dtype == torch.float32 and b.dtype == torch.float32:
        torch.mul(bt, scale, out=out)  # one pass: the transposing read and the scale, cheaper than two
    elif out.dtype == torch.float32:
        out.copy_(bt).mul_(scale)  # widen exactly, then scale in float32
    else:
        out.copy_(bt.to(torch.float32) * scale)

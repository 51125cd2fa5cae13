"""MiSS (and legacy Bone) weights of one module.

Balance and mini are exactly a rank-r LoRA: PEFT folds the input into r-wide
chunks and sums them (`x.reshape(..., in/r, r).sum(-2)`, zero-padded when
in % r != 0), then multiplies by the block `[r, out]` (mini: `[r, mini_r]`
repeated along out). The fold is the 0/1 matrix `A[j, i] = (i mod r == j)`, so
these rows ride the same batched (A, Bᵀ) path as LoRA. Host memory keeps only
the block; the fold is written straight into the device slot.

Bat multiplies the *base weight* by the block (`ΔW_blk = W_blk·B + B` per r×r
block), so it cannot be factored without W: it is served unmerged with a full
ΔW per adapter in the batch, and the merge path is the fast way to run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def fold_matrix(rank: int, in_features: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The MiSS fold as a matrix: `[r, in]`, 1 where `i mod r == j`."""
    cols = torch.arange(in_features, device=device)
    fold = torch.zeros(rank, in_features, device=device, dtype=dtype)
    fold[cols % rank, cols] = 1
    return fold


@dataclass(frozen=True)
class MissWeights:
    """Balance (`block [r, out]`) or mini (`block [r, mini_r]`, repeated along out)."""

    block: torch.Tensor  # [r, out] or [r, mini_r]
    in_features: int
    out_features: int
    batched: bool = True
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.block.shape[0])

    @property
    def nbytes(self) -> int:
        return self.block.numel() * self.block.element_size()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fold `[r, in]`, Bᵀ `[r, out]`): the LoRA form of this block."""
        fold = fold_matrix(self.rank, self.in_features, self.block.device, self.block.dtype)
        repeats = self.out_features // self.block.shape[1]
        return fold, self.block.repeat(1, repeats)  # [r, in], [r, out]

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW `[out, in]`: block column `i mod r` added to input column i (PEFT's merge)."""
        fold, bt = self.factors()
        delta = bt.to(base_weight.device, torch.float32).T @ fold.to(base_weight.device, torch.float32)
        return delta.to(base_weight.dtype)


@dataclass(frozen=True)
class BatWeights:
    """Bat: `block [out/r, r, r]`; ΔW depends on the base weight."""

    block: torch.Tensor  # [out/r, r, r]
    batched: bool = False
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.block.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.block.numel() * self.block.element_size()

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return bat_delta(base_weight, self.block)


def bat_delta(weight: torch.Tensor, block: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """PEFT's bat ΔW: per r×r block (o, i) of W, `W[o,i] @ B[o] + B[o]`; computed in float32, returned in
    `dtype` (default: the weight's)."""
    out_f, in_f = weight.shape
    r = block.shape[-1]
    b = block.to(weight.device, torch.float32)  # [out/r, r, r]
    w = weight.to(torch.float32).reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # [in/r, out/r, r, r]
    delta = w @ b + b  # [in/r, out/r, r, r]
    return delta.permute(1, 2, 0, 3).reshape(out_f, in_f).to(dtype or weight.dtype)

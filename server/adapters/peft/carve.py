"""Writing an adapter's tensors from the read buffer into its arena, many tensors per torch op.

Why: a rank-16 all-linear SmolLM2 adapter is 420 tensors, and copying them one by one (a view
of the buffer, a view of the arena, then a copy or a transposing multiply: several torch calls
each) spent more of a cold load in call overhead than in moving its 18.6 MiB. PEFT saves
tensors sorted by name, so one (module kind, role) of every layer — each layer's
`q_proj.lora_B`, say — sits at a constant stride in the file: one strided view reads them all
and one op writes them all, ~14 ops per adapter. Anything irregular (a rank pattern, an
unaligned offset) gets a run of its own; every path writes the same bits as copying the tensors
one by one (`lora.write_scaled_bt` scales and transposes B either way).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from server.adapters.peft.arena import Arena
from server.adapters.weights.lora import write_scaled_bt
from server.adapters.peft.safetensors_check import FLOAT_DTYPES, TensorInfo

_INDEX = re.compile(r"\.\d+\.")  # `.layers.12.` -> `.layers.#.`


@dataclass(frozen=True)
class Piece:
    """One stored tensor and how it lands in the arena: as is, or (B·s)ᵀ when `scale` is set."""

    src: TensorInfo
    scale: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.src.shape)


def carve(whole: torch.Tensor, pieces: Sequence[Piece], arena: Arena) -> list[torch.Tensor]:
    """Every piece written into `arena` (in its dtype); the views, in the order of `pieces`.
    `whole` is the file's bytes `[n]` uint8 (header included: TensorInfo offsets count from 0)."""
    views: list[torch.Tensor] = [torch.empty(0)] * len(pieces)
    for run in _runs(pieces):
        for i, view in zip(run, _write_run(whole, [pieces[i] for i in run], arena)):
            views[i] = view
    return views


def source(whole: torch.Tensor, t: TensorInfo) -> torch.Tensor:
    """One stored tensor as a view of the buffer (a copy when its offset is not aligned to its dtype)."""
    dtype = FLOAT_DTYPES[t.dtype]  # only float dtypes get this far (peft_format refuses the rest)
    data = whole[t.offset:t.offset + t.nbytes]  # [nbytes] uint8
    if t.offset % dtype.itemsize:
        data = data.clone()  # safetensors does not promise aligned offsets
    return data.view(dtype).view(t.shape)


def _runs(pieces: Sequence[Piece]) -> Iterator[list[int]]:
    """Indices of pieces that one op can write: one role of one module kind (same dtype, shape and
    scale), aligned offsets at a constant stride, in file order."""
    kinds: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(pieces):  # the name with its layer index blanked: the same role of every layer
        kinds[(_INDEX.sub(".#.", p.src.name), p.src.dtype, p.src.shape, p.scale)].append(i)
    for indices in kinds.values():
        indices.sort(key=lambda i: pieces[i].src.offset)
        run: list[int] = []
        for i in indices:
            if not _aligned(pieces[i].src):
                yield [i]
                continue
            if len(run) >= 2 and _gap(pieces, run[-1], i) != _gap(pieces, run[0], run[1]):
                yield run
                run = []
            run.append(i)
        if run:
            yield run


def _aligned(t: TensorInfo) -> bool:
    return t.offset % FLOAT_DTYPES[t.dtype].itemsize == 0


def _gap(pieces: Sequence[Piece], i: int, j: int) -> int:
    return pieces[j].src.offset - pieces[i].src.offset


def _write_run(whole: torch.Tensor, run: list[Piece], arena: Arena) -> list[torch.Tensor]:
    first, n = run[0].src, len(run)
    src = _strided_source(whole, run) if _aligned(first) else source(whole, first).unsqueeze(0)  # [n, *shape]
    scale = run[0].scale
    if scale is None:
        dst = arena.take(n, *first.shape)
        dst.copy_(src)
    else:  # B [out, r] -> (B·s)ᵀ [r, out]
        rows, cols = first.shape
        dst = arena.take(n, cols, rows)
        write_scaled_bt(src, scale, dst)
    return list(dst.unbind(0))


def _strided_source(whole: torch.Tensor, run: list[Piece]) -> torch.Tensor:
    """The run's stored tensors as one view `[n, *shape]` of the buffer (offsets at a constant stride)."""
    first = run[0].src
    dtype = FLOAT_DTYPES[first.dtype]
    typed = whole[:whole.numel() - whole.numel() % dtype.itemsize].view(dtype)
    numel = math.prod(first.shape)
    stride = (run[1].src.offset - first.offset) // dtype.itemsize if len(run) > 1 else numel
    rows = typed.as_strided((len(run), numel), (stride, 1), first.offset // dtype.itemsize)  # [n, numel]
    return rows.view(len(run), *first.shape)

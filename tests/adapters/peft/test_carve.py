"""Carving an adapter's stored tensors into its arena in batched ops: the same bits as one by one.

The reference is written out tensor by tensor: A and blocks cast to the served dtype, B scaled in
float32, transposed, then cast. Files are written by safetensors itself, so the layout (sorted
names, `layers.10` before `layers.2`) is the real one; extra cases cover what breaks a run: a rank
pattern, a scale that differs, and an offset not aligned to its dtype.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from server.adapters.peft.arena import Arena
from server.adapters.peft.carve import Piece, _runs, carve, source
from server.adapters.peft.safetensors_check import TensorInfo, check_safetensors

LAYERS = 12  # two-digit layer numbers: name order is 0, 1, 10, 11, 2, ... and must not matter
P = "base_model.model.model.layers.{}."


def _file(tmp_path, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, TensorInfo]]:
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), check_safetensors(path, 1 << 30)


def _lora_tensors(dtype: torch.dtype, rank_of=lambda layer, mod: 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(LAYERS):
        for mod, (n_in, n_out) in {"self_attn.q_proj": (24, 24), "self_attn.k_proj": (24, 8),
                                   "mlp.down_proj": (40, 24)}.items():
            r = rank_of(layer, mod)
            out[P.format(layer) + mod + ".lora_A.weight"] = torch.randn(r, n_in, generator=g).to(dtype)
            out[P.format(layer) + mod + ".lora_B.weight"] = torch.randn(n_out, r, generator=g).to(dtype)
    return out


def _pieces(infos: dict[str, TensorInfo], scale_of) -> list[Piece]:
    pieces = []
    for name in sorted(infos):
        t = infos[name]
        pieces.append(Piece(t, scale_of(name)) if name.endswith("lora_B.weight") else Piece(t))
    return pieces


def _expected(whole: torch.Tensor, piece: Piece, dtype: torch.dtype) -> torch.Tensor:
    stored = source(whole, piece.src)
    if piece.scale is None:
        return stored.to(dtype)
    return (stored.to(torch.float32) * piece.scale).T.to(dtype)  # PEFT's B·s in float32, then Bᵀ as served


def _check(whole, pieces, dtype) -> Arena:
    arena = Arena(sum(p.numel for p in pieces), dtype)
    views = carve(whole, pieces, arena)
    assert arena._used == arena.flat.numel()  # every element written exactly once, nothing left over
    for piece, view in zip(pieces, views):
        expected = _expected(whole, piece, dtype)
        assert view.dtype == dtype and view.shape == expected.shape, piece.src.name
        assert torch.equal(view, expected), piece.src.name  # bitwise, not approximately
        assert view.data_ptr() >= arena.flat.data_ptr()  # a view of the arena, not a copy
    return arena


@pytest.mark.parametrize("stored, served", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                            (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_batched_carving_equals_tensor_by_tensor(tmp_path, stored, served):
    whole, infos = _file(tmp_path, _lora_tensors(stored))
    pieces = _pieces(infos, lambda name: 0.5 if "down_proj" in name else 2.0)
    assert len(list(_runs(pieces))) == 6  # one op per role of each module kind, over all 12 layers
    _check(whole, pieces, served)


def test_irregular_runs_rank_pattern_and_per_module_scale(tmp_path):
    rank = lambda layer, mod: 8 if (layer == 3 and mod == "mlp.down_proj") else 4  # noqa: E731
    whole, infos = _file(tmp_path, _lora_tensors(torch.float32, rank))
    pieces = _pieces(infos, lambda name: 3.0 if "layers.7." in name else 1.5)
    assert 6 < len(list(_runs(pieces))) < len(pieces)  # broken runs, still batched around the odd ones
    _check(whole, pieces, torch.float32)


def test_blocks_of_any_rank_and_an_unaligned_offset(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {P.format(i) + "mlp.up_proj.miss_block": torch.randn(4, 3, 3, generator=g) for i in range(LAYERS)}
    whole, infos = _file(tmp_path, tensors)
    _check(whole, _pieces(infos, lambda name: None), torch.float32)
    # safetensors writers need not align offsets: a float32 tensor two bytes into the buffer
    t = torch.randn(5, 7, generator=g)
    raw = torch.frombuffer(bytearray(b"\0\0" + t.numpy().tobytes() + b"\0\0"), dtype=torch.uint8)
    odd = TensorInfo("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight", "F32", (5, 7), t.numel() * 4, 2)
    arena = _check(raw, [Piece(odd, 0.25)], torch.float32)
    torch.testing.assert_close(arena.flat.view(7, 5), (t * 0.25).T, rtol=0, atol=0)

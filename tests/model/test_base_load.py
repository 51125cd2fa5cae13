"""load_base: the layout of the base weights on CPU (values unchanged, strides chosen for the GEMM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.model.load import load_base
from tests.harness import cpu_settings


def _load(model_dir: Path, column_major: bool):
    return load_base(cpu_settings(model_dir, cpu_column_major=column_major))


@pytest.fixture(scope="module")
def both(tiny_model_dir: Path):
    return _load(tiny_model_dir, True), _load(tiny_model_dir, False)


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_cpu_float32_linear_weights_are_column_major_with_the_same_values(both) -> None:
    col, row = both
    col_lin, row_lin = _linears(col.model), _linears(row.model)
    assert col_lin.keys() == row_lin.keys() and len(col_lin) > 10
    for name, mod in col_lin.items():
        out_f, in_f = mod.weight.shape
        assert mod.weight.stride() == (1, out_f), name  # the transpose [in, out] is contiguous
        assert row_lin[name].weight.is_contiguous(), name
        assert torch.equal(mod.weight, row_lin[name].weight), name


def test_tied_lm_head_stays_tied_and_the_embedding_reads_the_same_rows(both) -> None:
    col, row = both
    model = col.model
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 300, 1000, 4]])
    assert torch.equal(model.get_input_embeddings()(ids), row.model.get_input_embeddings()(ids))


def test_forward_matches_the_row_major_model(both) -> None:
    """Only the GEMM's summation order may differ: logits agree to float32 rounding, greedy tokens exactly."""
    col, row = both
    ids = torch.tensor([[1, 42, 7, 99, 512, 3, 18, 250]])
    with torch.no_grad():
        a, b = col.model(ids).logits, row.model(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))

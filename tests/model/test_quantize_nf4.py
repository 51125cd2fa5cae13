"""nf4 and fp4 (bitsandbytes) quantization of the base: the same layers and bytes as transformers' BitsAndBytesConfig,
the bytes it saves, pre-quantized checkpoints, float32 compute on the CPU, and the refusals."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from server.model.load import load_base
from server.model.quantize import (QuantizeError, dense_weight, import_bitsandbytes, is_quantized, model_bytes,
                                   quantized_mode)
from tests.harness import cpu_settings
from tests.quantized_base import reference, same_quantization


@pytest.fixture(scope="module")
def bases(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return {mode: load_base(cpu_settings(tiny_model_dir, store, quantize=mode)) for mode in ("none", "nf4", "fp4")}


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_4bit_is_transformers_bitsandbytes_4bit_byte_for_byte(bases, tiny_model_dir, mode):
    """Same Linear4bit layers (all but the tied lm_head), same packed codes, absmax, block size 64, no double
    quantization: the base QLoRA adapters were trained on."""
    model = bases[mode].model
    assert bases[mode].quantize == mode
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, m in linears.items() if not is_quantized(m.weight)} == {"lm_head"}
    state = linears["model.layers.0.mlp.down_proj"].weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested, state.dtype) == (mode, 64, False, torch.float32)
    ref = reference(tiny_model_dir, mode).model
    assert {type(m).__name__ for m in ref.modules()} == {type(m).__name__ for m in model.modules()}
    assert not same_quantization(ref, model) and not same_quantization(model, ref)
    assert quantized_mode(ref) == mode  # what a pre-quantized checkpoint of it is served as


def test_bytes_of_the_nf4_base(bases):
    """Half a byte per weight, a float32 absmax per 64 weights, and each layer's 16-value code book."""
    dense, quant = model_bytes(bases["none"].model), model_bytes(bases["nf4"].model)
    linears = [m for n, m in bases["none"].model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    saved = sum(m.out_features * m.in_features * 4 - (m.out_features * m.in_features // 2
                                                      + m.out_features * m.in_features // 64 * 4 + 16 * 4)
                for m in linears)
    assert quant == dense - saved


def test_nf4_computes_in_float32_on_the_cpu_and_stays_as_transformers_laid_it_out(bases):
    """bitsandbytes would repack the weight on an AVX512-BF16 CPU at the first no-grad forward (bfloat16
    matmul and absmax); the server's layers keep the float32 matmul of the dequantized weight instead."""
    model = bases["nf4"].model
    down = dict(model.named_modules())["model.layers.0.mlp.down_proj"]
    before = down.weight.data.clone()
    x = torch.randn(3, down.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = down(x)
    assert torch.equal(down.weight.data, before)
    torch.testing.assert_close(got, x @ dense_weight(down.weight).T, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[5, 17, 300, 2048, 9]])
    with torch.no_grad():
        dense, quant = (bases[m].model(input_ids=ids).logits for m in ("none", "nf4"))
    assert 0 < float((dense - quant).abs().max()) < 0.2 * float(dense.abs().max())


def test_a_bitsandbytes_nf4_checkpoint_loads_pre_quantized(tiny_model_dir, tmp_path, bases):
    """Saved by transformers with BitsAndBytesConfig(load_in_4bit): loads on the CPU as it is, in float32."""
    ref = reference(tiny_model_dir, "nf4")
    ref.model.save_pretrained(tmp_path / "q")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, tmp_path / "q" / name)
    loaded = load_base(cpu_settings(tmp_path / "q", tmp_path / "store", quantize="nf4"))
    assert loaded.quantize == "nf4" and not same_quantization(loaded.model, bases["nf4"].model)
    ids = torch.tensor([[5, 17, 300, 2048, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, bases["nf4"].model(input_ids=ids).logits,
                                   atol=0, rtol=0)
    with pytest.raises(QuantizeError, match=r"pre-quantized \(nf4 weight-only, bitsandbytes\): start with "
                                            r"--quantize nf4, not int8"):
        load_base(cpu_settings(tmp_path / "q", tmp_path / "store", quantize="int8"))


def test_without_bitsandbytes_nf4_is_refused_naming_the_extra(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when not installed
    with pytest.raises(QuantizeError, match=r"--quantize nf4\|fp4 needs bitsandbytes "
                                            r"\(pip install 'loraplex\[quant\]'\)"):
        import_bitsandbytes()
    with pytest.raises(QuantizeError, match="needs bitsandbytes"):
        load_base(cpu_settings(tiny_model_dir, tmp_path / "store", quantize="nf4"))


def test_unknown_modes_are_refused(tiny_model_dir):
    from pydantic import ValidationError

    from server.model.quantize import quantize_base

    with pytest.raises(QuantizeError, match=r"unknown quantize mode 'int2'; one of \['none', 'int8', 'int4', 'nf4', "
                                            r"'fp4'\]"):
        quantize_base(torch.nn.Linear(4, 4), "int2", torch.device("cpu"), torch.float32)
    with pytest.raises(ValidationError, match="quantize"):
        cpu_settings(tiny_model_dir, quantize="int2")


def test_only_bitsandbytes_missing_kernels_line_is_dropped(caplog):
    """The optional `kernels` package's absence is dropped; any other failure of that loader still shows."""
    import logging

    from server.model.torchao_noise import silence_torchao_noise

    silence_torchao_noise()
    missing = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
               "sure you already `pip install kernels` and the kernels >= 0.11.1")
    other = "Failed to load CPU gemm_4bit_forward from kernels-community: kernel ABI mismatch. Please make sure ..."
    with caplog.at_level(logging.WARNING):
        for line in (missing, other):
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(line)
    assert [r.getMessage() for r in caplog.records] == [other]

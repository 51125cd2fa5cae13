"""Weight-only quantization of the base (torchao): which layers, how many bytes, pre-quantized checkpoints,
the refusals, and a start-up log free of torchao's import noise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from server.model.load import load_base
from server.model.quantize import (QuantizeError, check_mode, is_quantized, model_bytes, quantize_base,
                                   tensor_bytes)
from tests.harness import REPO_ROOT, cpu_settings
from tests.quantized_base import reference, same_quantization


@pytest.fixture(scope="module")
def bases(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return {mode: load_base(cpu_settings(tiny_model_dir, store, quantize=mode)) for mode in ("none", "int8")}


def test_int8_quantizes_every_linear_but_the_tied_lm_head(bases):
    model = bases["int8"].model
    assert bases["int8"].quantize == "int8" and bases["none"].quantize == "none"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, m in linears.items() if not is_quantized(m.weight)} == {"lm_head"}
    assert type(linears["model.layers.0.mlp.down_proj"].weight).__name__ == "Int8Tensor"
    assert not is_quantized(model.get_input_embeddings().weight)


def test_bytes_of_the_base_per_mode(bases):
    """int8: one byte per weight plus a float32 scale and an int8 zero point per output row."""
    dense, quant = model_bytes(bases["none"].model), model_bytes(bases["int8"].model)
    linears = [m for n, m in bases["int8"].model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    saved = sum(m.out_features * m.in_features * 4 - (m.out_features * m.in_features + m.out_features * 5)
                for m in linears)
    assert quant == dense - saved
    w = linears[0].weight
    assert tensor_bytes(w) == w.shape[0] * w.shape[1] + w.shape[0] * 5


def test_int8_logits_stay_close_to_the_dense_base(bases):
    ids = torch.tensor([[5, 17, 300, 2048, 9]])
    with torch.no_grad():
        dense, quant = (bases[m].model(input_ids=ids).logits for m in ("none", "int8"))
    assert 0 < float((dense - quant).abs().max()) < 0.05 * float(dense.abs().max())


def test_a_torchao_checkpoint_loads_pre_quantized(tiny_model_dir, tmp_path, bases):
    """Saved by transformers with TorchAoConfig: served as it is, in the mode it was saved in."""
    ref = reference(tiny_model_dir)
    ref.model.save_pretrained(tmp_path / "q")
    ref.model.config.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            (tmp_path / "q" / name).write_bytes((tiny_model_dir / name).read_bytes())
    loaded = load_base(cpu_settings(tmp_path / "q", tmp_path / "store", quantize="int8"))
    assert loaded.quantize == "int8" and not same_quantization(loaded.model, bases["int8"].model)
    with pytest.raises(QuantizeError, match=r"pre-quantized \(int8 weight-only, torchao\): start with --quantize "
                                            r"int8, not none"):
        load_base(cpu_settings(tmp_path / "q", tmp_path / "store"))


def test_int4_is_refused_on_the_cpu_with_the_reason():
    with pytest.raises(QuantizeError, match="int4 runs on CUDA only.*use --quantize int8 or nf4"):
        check_mode("int4", torch.device("cpu"), torch.float32)
    with pytest.raises(QuantizeError, match="int4 needs --dtype bfloat16"):
        check_mode("int4", torch.device("cuda"), torch.float32)
    with pytest.raises(QuantizeError, match="unknown quantize mode 'nf3'"):
        quantize_base(torch.nn.Linear(4, 4), "nf3", torch.device("cpu"), torch.float32)


def test_importing_the_server_logs_no_torchao_noise():
    """torchao's CUDA-only extension failures and torch's Enum-pytree deprecation stay out of our logs."""
    code = ("import logging; logging.basicConfig(level=logging.DEBUG); import server.engine.engine; "
            "import torchao.prototype.mx_formats.config; import bitsandbytes, peft; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr[-2000:]
    assert "kernels" not in done.stderr, done.stderr[-2000:]


def test_only_the_two_known_torchao_lines_are_dropped(caplog):
    import logging

    from server.model.torchao_noise import silence_torchao_noise

    silence_torchao_noise()
    with caplog.at_level(logging.WARNING):
        for line in ("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load",
                     "Failed to load /x/torchao/_C_cutlass_90a.abi3.so: Could not load",
                     "Failed to load /x/torchao/_C_other.so: a real problem"):
            logging.getLogger("torchao").warning(line)
    assert [r.getMessage() for r in caplog.records] == ["Failed to load /x/torchao/_C_other.so: a real problem"]


def test_a_checkpoint_quantized_by_another_library_is_refused_by_name(tiny_model_dir, tmp_path):
    import json
    import shutil

    model = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizeError, match="the checkpoint is quantized with 'gptq'; this server loads torchao"):
        load_base(cpu_settings(model, tmp_path / "store"))

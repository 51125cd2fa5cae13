"""Adapters served on an int8 weight-only base (torchao) and nf4 / fp4 ones (bitsandbytes), against PEFT on the
same quantized model.

PEFT wraps each quantized Linear (TorchaoLoraLinear or its bitsandbytes Linear4bit LoRA layer, MiSS, DoRA
through the dequantized weight) of a model transformers quantized with TorchAoConfig or BitsAndBytesConfig
(nf4 or fp4, float32 compute); ours is the same checkpoint through quantize_base. Every
row of a mixed batch (LoRA, all-linear LoRA, MiSS, DoRA, base) must give PEFT's logits for that row alone
and PEFT's greedy tokens: the wrappers call the quantized layer as-is and add the same adapter math.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from tests.quantized_base import ours, reference, same_quantization, save_tiny
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.model.quantize import is_quantized

KINDS = ["lora_qv", "lora_all", "miss_balance", "dora_qv"]
BASE = -1
ROWS = [0, BASE, 1, 2, 3, 0, 2]


@pytest.fixture(scope="module", params=[("int8", "cpu-kernel"), ("int8", "torch-bias"), ("nf4", "cpu-kernel"),
                                        ("nf4", "torch-bias"), ("fp4", "cpu-kernel")], ids="-".join)
def served(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    mode, kernel = request.param[0], request.param[1] == "cpu-kernel"
    config = {} if kernel else {"attention_bias": True, "mlp_bias": True}
    path = save_tiny(tmp / "model", **config)
    ref, base = reference(path, mode), ours(path, mode)
    settings = af.adapter_settings(tmp, max_adapters_resident=len(KINDS), cpu_kernels=kernel)
    limits = AdapterLimits.from_settings(settings)
    layers = inject_adapter_layers(base.model, limits)
    peft_models = {}
    for slot, kind in enumerate(KINDS):
        peft_models[slot] = af.make_peft(ref, kind, tmp / kind, seed=60 + slot)
        layers.load_slot(slot, read_adapter(tmp / kind, base, limits))
    return ref, base, peft_models, layers


def test_ours_and_transformers_quantize_the_same_layers_the_same_way(served):
    ref, base, _, layers = served
    assert not same_quantization(ref.model, base.model)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert is_quantized(q.base_layer.weight) and q.bank.slot_dtype == torch.float32  # adapters in the compute dtype
    assert not is_quantized(layers["lm_head"].base_layer.weight)  # tied to the embedding: kept dense


@pytest.mark.parametrize("length", [12, 5], ids=["prefill-segments", "short-grouped"])
def test_mixed_batch_matches_peft_on_the_quantized_model(served, length):
    _, base, peft_models, _ = served
    ids = torch.randint(3, af.VOCAB, (len(ROWS), length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(ROWS, length)):
        got = base.model(input_ids=ids).logits
    plain = af.logits_under(base.model, ids, BASE)
    for i, slot in enumerate(ROWS):
        if slot == BASE:
            torch.testing.assert_close(got[i], plain[i], atol=0, rtol=0)
            continue
        with torch.no_grad():
            expected = peft_models[slot](input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(got[i:i + 1], expected, atol=1e-4, rtol=1e-4)
        assert (expected - plain[i:i + 1]).abs().max() > 1e-2, "the adapter must change the output"


def test_greedy_mixed_decode_matches_peft_generate(served):
    _, base, peft_models, _ = served
    rows = [0, 2, BASE, 1, 3]
    ids = torch.randint(3, af.VOCAB, (len(rows), 6), generator=torch.Generator().manual_seed(9))
    out = af.greedy_mixed_decode(base.model, ids, rows)
    for i, slot in enumerate(rows):
        if slot == BASE:
            continue
        expected = af.peft_greedy(peft_models[slot], ids[i:i + 1])
        assert torch.equal(out[i:i + 1], expected), f"row {i} (slot {slot})"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_cuda_bfloat16_quantized_base_lora_matches_peft(mode, tmp_path):
    """On CUDA in bfloat16: int8, int4 (tinygemm, group size 64 for the tiny model's in_features), and nf4
    (bitsandbytes' CUDA kernels, bfloat16 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    from server.model.load import BaseModel
    from server.model.quantize import import_torchao, quantize_base

    import_torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    path = save_tiny(tmp_path / "model")
    cuda = torch.device("cuda")
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
              if mode == "nf4" else TorchAoConfig(Int8WeightOnlyConfig() if mode == "int8" else
                                                  Int4WeightOnlyConfig(group_size=64,
                                                                       int4_packing_format="tile_packed_to_4d")))
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda",
                                                     quantization_config=config).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(cuda).eval().requires_grad_(False)
    assert quantize_base(model, mode, cuda, torch.bfloat16).modules == 14
    assert mode != "nf4" or not same_quantization(ref_model, model)
    base = BaseModel(model=model, tokenizer=None, model_id="tiny", device=cuda, dtype=torch.bfloat16,
                     max_context=512, quantize=mode)
    ref = BaseModel(model=ref_model, tokenizer=None, model_id="tiny", device=cuda, dtype=torch.bfloat16,
                    max_context=512, quantize=mode)
    settings = af.adapter_settings(tmp_path, device="cuda", dtype="bfloat16", max_adapters_resident=2)
    limits = AdapterLimits.from_settings(settings)
    layers = inject_adapter_layers(base.model, limits)
    peft_model = af.make_peft(ref, "lora_all", tmp_path / "a", seed=3, scale=0.3)
    layers.load_slot(0, read_adapter(tmp_path / "a", base, limits))
    ids = torch.randint(3, af.VOCAB, (1, 6), generator=torch.Generator().manual_seed(1)).to(cuda)
    ours = ids
    for _ in range(6):
        with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots([0], ours.shape[1], device=cuda)):
            nxt = base.model(input_ids=ours).logits[:, -1].argmax(-1, keepdim=True)
        ours = torch.cat([ours, nxt], dim=1)
    theirs = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 min_new_tokens=6, do_sample=False, pad_token_id=af.EOS, eos_token_id=None)
    assert torch.equal(ours, theirs)

"""DoRA served unmerged, against PEFT itself: mixed batches of DoRA, LoRA, MiSS and base rows.

PEFT writes each adapter (random factors, magnitudes that differ from every column
norm), our reader loads it into a slot, and every row of a mixed batch must give the
logits of PEFT running that row alone (1e-4, float32) and PEFT's greedy tokens, on
the prefill (per segment) and short-run (grouped) paths, the C kernel's and torch's,
with and without a bias in the adapted projections (which the rescale leaves out).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.backend import CpuKernelBackend
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.step import adapter_step

KINDS = ["dora_qv", "lora_qv", "dora_all", "miss_balance"]
BASE = -1


@pytest.fixture(scope="module", params=["cpu-kernel", "torch", "torch-bias"])
def served(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dora")
    kernel = request.param == "cpu-kernel"
    config = {"attention_bias": True, "mlp_bias": True} if request.param.endswith("bias") else {}
    settings = af.adapter_settings(tmp, max_adapters_resident=len(KINDS), cpu_kernels=kernel)
    reference, ours = af.tiny_base(0, **config), af.tiny_base(0, **config)
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    assert isinstance(layers["model.layers.0.self_attn.q_proj"].backend, CpuKernelBackend) == kernel
    peft_models = {}
    for slot, kind in enumerate(KINDS):
        peft_models[slot] = af.make_peft(reference, kind, tmp / kind, seed=40 + slot)
        layers.load_slot(slot, read_adapter(tmp / kind, ours, AdapterLimits.from_settings(settings)))
    return ours.model, peft_models, layers


def _forward(model, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(row_slots, ids.shape[1])):
        return model(input_ids=ids).logits


def _peft(peft_models, base_model, ids: torch.Tensor, slot: int) -> torch.Tensor:
    with torch.no_grad():
        return (peft_models[slot] if slot != BASE else base_model)(input_ids=ids).logits


ROWS = [0, BASE, 1, 2, 3, 0, BASE, 2]


@pytest.mark.parametrize("length", [12, 5], ids=["prefill-segments", "short-grouped"])
def test_mixed_batch_matches_peft_row_by_row(served, length):
    model, peft_models, _ = served
    ids = torch.randint(3, af.VOCAB, (len(ROWS), length), generator=torch.Generator().manual_seed(length))
    got = _forward(model, ids, ROWS)
    base = _forward(model, ids, [BASE] * len(ROWS))
    for i, slot in enumerate(ROWS):
        expected = base[i:i + 1] if slot == BASE else _peft(peft_models, None, ids[i:i + 1], slot)
        torch.testing.assert_close(got[i:i + 1], expected, atol=1e-4, rtol=1e-4)
        if slot != BASE:
            assert (expected - base[i:i + 1]).abs().max() > 1e-2, "the adapter must change the output"


def test_bank_holds_the_rescale_of_dora_slots_only(served):
    """g − 1 rows for DoRA slots; zero rows for the others and for BASE_SLOT / TRAIN_SLOT (-1, -2)."""
    model, peft_models, layers = served
    q = layers["model.layers.0.self_attn.q_proj"].bank
    assert q.dora_slots == {0, 2} and q.dora is not None
    assert float(q.dora[0].abs().max()) > 1e-2 and not q.dora[[1, 3, -1, -2]].any()


def test_greedy_mixed_decode_matches_peft_generate(served):
    """Prefill then one-token steps (the grouped path, the C kernel's on cpu-kernel) in one mixed batch."""
    model, peft_models, _ = served
    rows = [0, 2, BASE, 1]
    ids = torch.randint(3, af.VOCAB, (len(rows), 6), generator=torch.Generator().manual_seed(9))
    out = af.greedy_mixed_decode(model, ids, rows)
    for i, slot in enumerate(rows):
        if slot == BASE:
            continue
        expected = af.peft_greedy(peft_models[slot], ids[i:i + 1])
        assert torch.equal(out[i:i + 1], expected), f"row {i} (slot {slot})"


def test_no_dora_slot_active_is_no_dora_work(served):
    """A step without DoRA rows never gathers the table (dora_active is False)."""
    from server.adapters.runtime.dora import dora_active

    _, _, layers = served
    bank = layers["model.layers.0.self_attn.q_proj"].bank
    lora_only = AdapterBatch.build(AdapterMapping.from_row_slots([1, BASE, 3], 4))
    assert not dora_active(bank, lora_only)
    assert dora_active(bank, AdapterBatch.build(AdapterMapping.from_row_slots([1, 0], 4)))


def test_slot_reused_by_plain_lora_drops_the_rescale(tmp_path):
    settings = af.adapter_settings(tmp_path, max_adapters_resident=1)
    reference, ours = af.tiny_base(0), af.tiny_base(0)
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    limits = AdapterLimits.from_settings(settings)
    af.make_peft(reference, "dora_qv", tmp_path / "d", seed=1)
    lora = af.make_peft(reference, "lora_qv", tmp_path / "l", seed=2)
    layers.load_slot(0, read_adapter(tmp_path / "d", ours, limits))
    bank = layers["model.layers.0.self_attn.q_proj"].bank
    assert bank.dora_slots == {0} and bank.nbytes() > 0
    layers.load_slot(0, read_adapter(tmp_path / "l", ours, limits))
    assert not bank.dora_slots and bank.dora is not None and not bank.dora.any()
    ids = af.token_ids(3)
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    torch.testing.assert_close(af.logits_under(ours.model, ids, 0), expected, atol=1e-4, rtol=1e-4)


# --- every backend at the layer level: Triton's kernels (interpreted on CPU), the C kernel, torch ------

IN, OUT = 48, 40
LAYER_SLOTS = [0] * 10 + [-1, 1, 0, 1] + [0, -1, 1]  # a DoRA prefill run, then decode-like short runs


def _dora_layer(backend, dtype: torch.dtype):
    """A biased Linear with DoRA in slot 0 and plain LoRA in slot 1; the expected output in float64."""
    from torch import nn

    from server.adapters.runtime.layers import AdaptedLinear
    from server.adapters.runtime.slots import SlotBank
    from server.adapters.weights.lora import LoraWeights, dora_scale

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(IN, OUT).requires_grad_(False)
    with torch.no_grad():
        base.bias.normal_(0.0, 1.0, generator=g)
    bank = SlotBank(2, IN, OUT, max_rank=16, device=torch.device("cpu"), dtype=dtype)
    a0, bt0, a1, bt1 = (torch.randn(s, generator=g) / 4 for s in ((8, IN), (8, OUT), (5, IN), (5, OUT)))
    scale = dora_scale(torch.rand(OUT, generator=g) + 0.5, a0, bt0, base.weight)
    bank.write(0, LoraWeights(a0, bt0, dora_scale=scale))
    bank.write(1, LoraWeights(a1, bt1))
    base = base.to(dtype)

    def expected(x: torch.Tensor) -> torch.Tensor:
        x64, w, b = x.double(), base.weight.double(), base.bias.double()
        rows = []
        for i, slot in enumerate(LAYER_SLOTS):
            y = x64[i] @ w.T
            if slot == 0:
                y = scale.double() * (y + x64[i] @ a0.double().T @ bt0.double())
            elif slot == 1:
                y = y + x64[i] @ a1.double().T @ bt1.double()
            rows.append(y + b)
        return torch.stack(rows)

    return AdaptedLinear(base, "proj", bank, backend), expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_applies_the_rescale(interpreted_triton_lora, dtype):
    from server.adapters.runtime.triton_backend import TritonBackend

    layer, expected = _dora_layer(TritonBackend(), dtype)
    x = torch.randn(len(LAYER_SLOTS), IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert layer.backend._takes(x, torch.empty(len(LAYER_SLOTS), OUT, dtype=dtype), layer.bank)  # the kernels
    with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots(LAYER_SLOTS)):
        got = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), expected(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["torch", "cpu-kernel"])
def test_torch_and_c_kernel_backends_apply_the_rescale(backend, tmp_path):
    from server.adapters.runtime.backend import TorchBackend
    from server.kernels.cpu import load_kernel

    if backend == "cpu-kernel":
        kernel = load_kernel(AdapterLimits.from_settings(af.adapter_settings(tmp_path)).kernel_cache_dir)
        assert kernel is not None
        chosen = CpuKernelBackend(kernel)
    else:
        chosen = TorchBackend()
    layer, expected = _dora_layer(chosen, torch.float32)
    x = torch.randn(len(LAYER_SLOTS), IN, generator=torch.Generator().manual_seed(1))
    if backend == "cpu-kernel":  # the short runs go through the C kernel
        grouped = AdapterBatch.build(AdapterMapping.from_token_slots(LAYER_SLOTS)).grouped
        assert grouped is not None and chosen._takes(x, torch.empty(len(LAYER_SLOTS), OUT), layer.bank, grouped)
    with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots(LAYER_SLOTS)):
        got = layer(x)
    torch.testing.assert_close(got.double(), expected(x), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_batch_matches_peft(tmp_path):
    """The compiled Triton kernels and the rescale after them, on the GPU, against PEFT there."""
    from server.adapters.runtime.triton_backend import TritonBackend

    settings = af.adapter_settings(tmp_path, max_adapters_resident=len(KINDS))
    reference, ours = af.tiny_base(0, attention_bias=True), af.tiny_base(0, attention_bias=True)
    ours.model.to("cuda")
    ours = dataclasses.replace(ours, device=torch.device("cuda"))
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    assert isinstance(layers["model.layers.0.self_attn.q_proj"].backend, TritonBackend)
    peft_models = {}
    for slot, kind in enumerate(KINDS):
        peft_models[slot] = af.make_peft(reference, kind, tmp_path / kind, seed=40 + slot).to("cuda")
        layers.load_slot(slot, read_adapter(tmp_path / kind, ours, AdapterLimits.from_settings(settings)))
    layers.copier.join()
    ids = torch.randint(3, af.VOCAB, (len(ROWS), 5), generator=torch.Generator().manual_seed(5)).to("cuda")
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(ROWS, ids.shape[1], "cuda")):
        got = ours.model(input_ids=ids).logits
    for i, slot in enumerate(ROWS):
        if slot != BASE:
            torch.testing.assert_close(got[i:i + 1], _peft(peft_models, None, ids[i:i + 1], slot),
                                       atol=1e-4, rtol=1e-4)

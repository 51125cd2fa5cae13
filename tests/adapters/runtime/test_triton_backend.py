"""TritonBackend through real adapter layers: equal to TorchBackend and to the per-token reference.

On CPU the kernels run on Triton's interpreter (the `interpreted_triton_lora` fixture sets it up);
the `cuda` tests run them compiled, on a model on the GPU (`pytest -m cuda`).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import adapter_factory as af
from layer_reference import reference
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.backend import TorchBackend
from server.adapters.runtime.inject import AdapterLayers, inject_adapter_layers
from server.adapters.runtime.layers import AdaptedLinear
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.plan import AdapterBatch
from server.adapters.runtime.slots import SlotBank
from server.adapters.runtime.step import adapter_step
from server.adapters.weights.lora import LoraWeights

IN, OUT = 48, 40
RANKS = [8, 3, 16, 5]  # ragged: the bank's r_cap is 16, slot 1 uses 3 of its rows
KINDS = ["lora_all", "miss_balance", "miss_bat", "lora_embed"]  # slot = index
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _linear_pair(dtype: torch.dtype, device: str = "cpu") -> tuple[AdaptedLinear, AdaptedLinear]:
    """One Linear and one SlotBank, wrapped twice: through TritonBackend and through TorchBackend."""
    from server.adapters.runtime.triton_backend import TritonBackend

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(IN, OUT).to(device, dtype).requires_grad_(False)
    bank = SlotBank(len(RANKS), IN, OUT, max_rank=16, device=torch.device(device), dtype=dtype)
    for slot, r in enumerate(RANKS):
        bank.write(slot, LoraWeights(a=torch.randn(r, IN, generator=g), bt=torch.randn(r, OUT, generator=g) / 4))
    return AdaptedLinear(base, "proj", bank, TritonBackend()), AdaptedLinear(base, "proj", bank, TorchBackend())


SLOT_MAPS = {
    "decode-scattered": [3, 0, -1, 3, 2, 1, 0, -1],
    "prefill": [2] * 12 + [0] * 9,
    "mixed": [1] * 10 + [-1, 3, 0, 3] + [2] * 8 + [-1] * 2,
    "base-only": [-1] * 4,
}


@pytest.mark.parametrize("slots", SLOT_MAPS.values(), ids=SLOT_MAPS.keys())
def test_float32_layer_equals_torch_backend_and_reference(interpreted_triton_lora, slots):
    triton_layer, torch_layer = _linear_pair(torch.float32)
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(len(slots)))
    mapping = AdapterMapping.from_token_slots(slots)
    assert triton_layer.backend._takes(x, torch.empty(len(slots), OUT), triton_layer.bank)  # the kernels, not torch
    with torch.no_grad(), adapter_step(mapping):
        got, want = triton_layer(x), torch_layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, reference(triton_layer, x, mapping), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_layer_rounds_once_without_widening_y(interpreted_triton_lora, dtype):
    triton_layer, torch_layer = _linear_pair(dtype)
    slots = SLOT_MAPS["mixed"]
    x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    mapping = AdapterMapping.from_token_slots(slots)
    batch = AdapterBatch.build(mapping)
    assert triton_layer._rounds_in_place(batch) and not torch_layer._rounds_in_place(batch)
    with torch.no_grad(), adapter_step(mapping):
        got, want = triton_layer(x), torch_layer(x)
    assert got.dtype == dtype
    # both round the float32 sum once; the interpreter's float→16-bit cast truncates: one ulp apart at most
    assert ((got.double() - want.double()).abs() <= _ulp(got, want)).all()


def test_autograd_goes_to_torch_and_keeps_the_graph(interpreted_triton_lora):
    triton_layer, torch_layer = _linear_pair(torch.float32)
    slots = SLOT_MAPS["decode-scattered"]
    x = torch.randn(len(slots), IN, requires_grad=True)
    with adapter_step(AdapterMapping.from_token_slots(slots)):
        got, want = triton_layer(x), torch_layer(x)
    assert got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (grad_ref,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(grad, grad_ref)


def _ulp(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """One ulp of the tensors' dtype at the larger magnitude of each pair (float64)."""
    info = torch.finfo(got.dtype)
    return info.eps * torch.maximum(got.double().abs(), want.double().abs()).clamp_min(info.tiny)


# --- a whole model: every kind resident, a mixed step ------------------------------------------------

def _models(tmp_path, dtype: torch.dtype, device: str, triton_backend) -> tuple[nn.Module, nn.Module]:
    """The tiny Llama twice with the same adapters in the same slots: through `triton_backend` (None:
    the one injection picks for the device) and through TorchBackend."""
    settings = af.adapter_settings(tmp_path, max_adapters_resident=len(KINDS))
    limits = AdapterLimits.from_settings(settings)
    host = af.tiny_base(seed=0)
    adapters = []
    for slot, kind in enumerate(KINDS):
        af.make_peft(af.tiny_base(seed=0), kind, tmp_path / kind, seed=40 + slot, scale=0.3)
        adapters.append(read_adapter(tmp_path / kind, host, limits))
    models = []
    for backend in (triton_backend, TorchBackend()):
        model = copy.deepcopy(host.model).to(device, dtype)
        layers = inject_adapter_layers(model, limits, backend=backend)
        _load(layers, adapters)
        models.append((model, layers))
    (fast, fast_layers), (ref, _) = models
    if triton_backend is None:
        from server.adapters.runtime.triton_backend import TritonBackend

        assert isinstance(fast_layers["model.layers.0.self_attn.q_proj"].backend, TritonBackend)
    return fast, ref


def _load(layers: AdapterLayers, adapters) -> None:
    for slot, adapter in enumerate(adapters):
        layers.load_slot(slot, adapter)


def _step_logits(model: nn.Module, device: str) -> torch.Tensor:
    """One forward of 5 rows, each on its own slot or the base (bat's through torch, the embedding's too)."""
    ids = af.token_ids(seed=7, rows=5, length=9).to(device)
    mapping = AdapterMapping.from_row_slots([0, 1, -1, 2, 3], 9, device)
    with torch.no_grad(), adapter_step(mapping):
        return model(input_ids=ids).logits.float()  # [4, 9, vocab]


def test_model_step_equals_torch_backend(interpreted_triton_lora, tmp_path, monkeypatch):
    from server.adapters.runtime.triton_backend import TritonBackend

    fast, ref = _models(tmp_path, torch.float32, "cpu", TritonBackend())
    calls: list[int] = []
    add_lora = interpreted_triton_lora.add_lora
    monkeypatch.setattr(interpreted_triton_lora, "add_lora", lambda *a: calls.append(1) or add_lora(*a))
    torch.testing.assert_close(_step_logits(fast, "cpu"), _step_logits(ref, "cpu"), atol=1e-3, rtol=1e-4)
    slotted = [n for n, layer in fast._loraplex_layers.layers.items()
               if isinstance(layer, AdaptedLinear) and layer.bank.r_used]
    assert len(calls) == len(slotted) > 10  # every slotted Linear through the kernels, once per forward


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_step_equals_torch_backend(tmp_path, dtype):
    fast, ref = _models(tmp_path, dtype, "cuda", None)
    got, want = _step_logits(fast, "cuda"), _step_logits(ref, "cuda")
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    else:  # both round each module's sum once; summation order differs, so activations may differ by an ulp
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_equals_torch_backend(dtype):
    triton_layer, torch_layer = _linear_pair(dtype, "cuda")
    for slots in SLOT_MAPS.values():
        x = torch.randn(len(slots), IN, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
        with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots(slots, "cuda")):
            got, want = triton_layer(x), torch_layer(x)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        else:  # each the exact sum rounded to nearest once: equal, or one ulp apart
            assert ((got.double() - want.double()).abs() <= _ulp(got, want)).all(), slots


@pytest.mark.cuda
@needs_cuda
def test_cuda_two_launches_per_adapted_module_and_no_copy():
    """The adapter term of one module is the shrink and the expand, nothing else: no index tensor,
    no host↔device copy, no cast of y (the plan was built before the forward)."""
    from torch.profiler import ProfilerActivity, profile

    triton_layer, _ = _linear_pair(torch.bfloat16, "cuda")
    slots = [3, 0, -1, 3, 2, 1, 0, -1] * 4  # 32 decode rows, scattered slots
    x = torch.randn(len(slots), IN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), adapter_step(AdapterMapping.from_token_slots(slots, "cuda")):
        triton_layer(x)  # compile and warm up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as adapted:
            triton_layer(x)
            torch.cuda.synchronize()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as base:
        triton_layer.base_layer(x)
        torch.cuda.synchronize()
    kernels = lambda p: [e.name for e in p.events() if e.device_type.name == "CUDA"]  # noqa: E731
    extra = kernels(adapted)
    for name in kernels(base):
        extra.remove(name)
    assert len(extra) == 2 and "shrink" in " ".join(extra) and "expand" in " ".join(extra), extra

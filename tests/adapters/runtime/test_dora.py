"""DoRA served unmerged, against PEFT itself: mixed batches of DoRA, LoRA, MiSS and base rows.

PEFT writes each adapter (random factors, magnitudes that differ from every column
norm), our reader loads it into a slot, and every row of a mixed batch must give the
logits of PEFT running that row alone (1e-4, float32) and PEFT's greedy tokens, on
the prefill (per segment) and short-run (grouped) paths, the C kernel's and torch's,
with and without a bias in the adapted projections (which the rescale leaves out).
"""

from __future__ import annotations

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
    from transformers import DynamicCache

    model, peft_models, _ = served
    rows = [0, 2, BASE, 1]
    ids = torch.randint(3, af.VOCAB, (len(rows), 6), generator=torch.Generator().manual_seed(9))
    cache, out = DynamicCache(), ids
    with torch.no_grad():
        with adapter_step(AdapterMapping.from_row_slots(rows, ids.shape[1])):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(6):
            nxt = logits.argmax(-1, keepdim=True)  # [rows, 1]
            out = torch.cat([out, nxt], dim=1)
            with adapter_step(AdapterMapping.from_row_slots(rows, 1)):
                logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    for i, slot in enumerate(rows):
        if slot == BASE:
            continue
        expected = peft_models[slot].generate(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]),
                                              max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                              pad_token_id=af.EOS, eos_token_id=None)
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

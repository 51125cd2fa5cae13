"""Our injected layers vs PEFT itself, for every supported adapter kind (float32, tiny Llama).

Each adapter is written by PEFT's `save_pretrained` with non-zero random weights,
read by our validator into a device slot, and must give PEFT's logits (1e-4)
and PEFT's greedy `generate` tokens exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.step import adapter_step

KINDS = af.ALL_KINDS
EOS = af.EOS


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    settings = af.adapter_settings(tmp, max_adapters_resident=len(KINDS))
    reference = af.tiny_base(seed=0)  # PEFT wraps deep copies of this one
    ours = af.tiny_base(seed=0)
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    peft_models, slots = {}, {}
    for slot, kind in enumerate(KINDS):
        peft_models[kind] = af.make_peft(reference, kind, tmp / kind, seed=10 + slot)
        layers.load_slot(slot, read_adapter(tmp / kind, ours, AdapterLimits.from_settings(settings)))
        slots[kind] = slot
    return ours, peft_models, slots


_ids, _ours, _greedy = af.token_ids, af.logits_under, af.greedy_under  # shared with tests/adapters/test_merge.py


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_peft(zoo, kind):
    ours, peft_models, slots = zoo
    ids = _ids(1)
    with torch.no_grad():
        expected = peft_models[kind](input_ids=ids).logits
        base = _ours(ours.model, ids, -1)
    got = _ours(ours.model, ids, slots[kind])
    assert (expected - base).abs().max() > 1e-2, "the adapter must change the output for this test to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_peft_generate(zoo, kind):
    ours, peft_models, slots = zoo
    ids = _ids(2, length=5)
    with torch.no_grad():
        expected = peft_models[kind].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                              do_sample=False, pad_token_id=EOS, eos_token_id=EOS)
    got = _greedy(ours.model, ids, slots[kind], steps=8)
    assert expected.shape[1] > ids.shape[1] + 2, "generation should not stop at once"
    assert got.tolist() == expected.tolist()


def test_decode_rows_match_peft(zoo):
    """Short rows of four kinds in one batch (the grouped decode path) agree with PEFT's full forward."""
    ours, peft_models, slots = zoo
    kinds = ["lora_all", "miss_mini", "bone_bat", "lora_embed"]
    ids = _ids(3, rows=len(kinds), length=6)
    with torch.no_grad():
        expected = torch.stack([peft_models[k](input_ids=ids[i:i + 1]).logits[0, -1] for i, k in enumerate(kinds)])
        # Rows shorter than LONG_RUN: every token goes through the grouped (decode) path.
        mapping = AdapterMapping.from_token_slots([slots[k] for k in kinds for _ in range(ids.shape[1])])
        with adapter_step(mapping):
            got = ours.model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

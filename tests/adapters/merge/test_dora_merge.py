"""The merge path for DoRA against PEFT's `merge_and_unload`: `W' = m/‖W + s·BA‖_col · (W + s·BA)`."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.merge.merged_copy import build_merged_copy, install
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.types import AdapterKey

LANE = 7


@pytest.fixture(scope="module", params=af.DORA_KINDS)
def merged(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp("dora-merge")
    settings = af.adapter_settings(tmp, max_adapters_resident=1)
    reference, ours = af.tiny_base(0, attention_bias=True), af.tiny_base(0, attention_bias=True)
    layers = inject_adapter_layers(ours.model, AdapterLimits.from_settings(settings))
    peft = af.make_peft(reference, kind, tmp / kind, seed=5)
    adapter = read_adapter(tmp / kind, ours, AdapterLimits.from_settings(settings))
    layers.load_slot(0, adapter)
    merged_copy = build_merged_copy(layers, adapter, AdapterKey("t", kind.replace("_", "-"), 1), LANE)
    install(layers, merged_copy)
    peft_merged = copy.deepcopy(peft).merge_and_unload()
    return ours, merged_copy, peft_merged


def test_merged_weights_equal_peft_merge_and_unload(merged):
    _, merged_copy, peft_merged = merged
    modules = dict(peft_merged.named_modules())
    assert merged_copy.weights
    for name, weight in merged_copy.weights.items():
        torch.testing.assert_close(weight, modules[name].weight, atol=1e-5, rtol=1e-5)


def test_merged_lane_logits_and_greedy_equal_peft_merged(merged):
    ours, merged_copy, peft_merged = merged
    ids = af.token_ids(4)
    with torch.no_grad():
        expected = peft_merged(input_ids=ids).logits
    torch.testing.assert_close(af.logits_under(ours.model, ids, -1, lane=LANE), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(af.logits_under(ours.model, ids, 0), expected, atol=1e-4, rtol=1e-4)
    prompt = af.token_ids(5, length=5)
    with torch.no_grad():
        want = peft_merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, pad_token_id=af.EOS, eos_token_id=af.EOS)
    got = af.greedy_under(ours.model, prompt, -1, steps=8, lane=LANE)
    assert got.tolist() == want[:, :got.shape[1]].tolist()

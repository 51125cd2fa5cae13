"""The merge path for modules_to_save: a dedicated lane reads the adapter's copies as the modules' weights,
equal to PEFT's `merge_and_unload` (which puts the copy in the module's place), tied base or not."""

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

LANE = 3


@pytest.fixture(scope="module", params=[(k, t) for k in af.SAVED_KINDS for t in (True, False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def merged(request, tmp_path_factory):
    kind, tie = request.param
    tmp = tmp_path_factory.mktemp("mts-merge")
    limits = AdapterLimits.from_settings(af.adapter_settings(tmp, max_adapters_resident=1))
    reference, ours = af.tiny_base(0, tie_word_embeddings=tie), af.tiny_base(0, tie_word_embeddings=tie)
    layers = inject_adapter_layers(ours.model, limits)
    peft = af.make_peft(reference, kind, tmp / kind, seed=5)
    adapter = read_adapter(tmp / kind, ours, limits)
    merged_copy = build_merged_copy(layers, adapter, AdapterKey("t", kind.replace("_", "-"), 1), LANE)
    install(layers, merged_copy)
    return ours, adapter, merged_copy, copy.deepcopy(peft).merge_and_unload()


def test_lane_holds_the_copies_once(merged):
    _, adapter, merged_copy, peft_merged = merged
    modules = dict(peft_merged.named_modules())
    for name in adapter.saved.names():
        assert torch.equal(merged_copy.weights[name], modules[name].weight)
    distinct = {id(merged_copy.weights[name]) for name in adapter.saved.names()}
    assert len(distinct) == adapter.saved.copies  # a tied copy: one tensor for both modules, as in PEFT


def test_merged_lane_logits_and_greedy_equal_peft_merged(merged):
    ours, _, _, peft_merged = merged
    ids = af.token_ids(4)
    with torch.no_grad():
        expected = peft_merged(input_ids=ids).logits
    torch.testing.assert_close(af.logits_under(ours.model, ids, -1, lane=LANE), expected, atol=1e-4, rtol=1e-4)
    prompt = af.token_ids(5, length=5)
    with torch.no_grad():
        want = peft_merged.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                    do_sample=False, pad_token_id=af.EOS, eos_token_id=af.EOS)
    got = af.greedy_under(ours.model, prompt, -1, steps=6, lane=LANE)
    assert got.tolist() == want[:, :got.shape[1]].tolist()

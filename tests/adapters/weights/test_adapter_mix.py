"""Weighted adapter mixes (weights/mix.py) served unmerged in mixed batches, against PEFT.

A 0.7/0.3 LoRA mix must give PEFT's `add_weighted_adapter(combination_type="cat")`
logits (1e-4, float32) and greedy tokens while rows of each member, the base and a
MiSS adapter share its batch. MiSS mixes must equal PEFT running the weighted sum
of the blocks; mixes PEFT cannot build (LoRA with MiSS, bat) must equal the base
plus the weighted sum of each member's PEFT-merged ΔW. What cannot be mixed exactly
is refused with a message that names why.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.adapters.weights.mix import MAX_MIX_MEMBERS, MixMember, mix_adapters
from server.adapters.weights.lora import LoraWeights
from server.adapters.weights.miss import BatWeights, MissWeights
from server.errors import AdapterError, InvalidRequest

BASE = -1
# name -> (kind, seed)
SOURCES = {"a": ("lora_qv", 50), "b": ("lora_embed", 51), "m1": ("miss_balance", 52), "m2": ("miss_balance", 53),
           "mini": ("miss_mini", 54), "bat1": ("miss_bat", 55), "bat2": ("miss_bat", 56), "dora": ("dora_qv", 57),
           "head": ("mts_head", 58)}
MIX, A, B, M1, MISS_MIX, LORA_MISS, BAT_MIX = range(7)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    settings = af.adapter_settings(tmp, max_adapters_resident=7, max_rank=32)
    limits = AdapterLimits.from_settings(settings)
    peft_base, ours = af.tiny_base(0), af.tiny_base(0)
    layers = inject_adapter_layers(ours.model, limits)
    loaded = {}
    for name, (kind, seed) in SOURCES.items():
        af.make_peft(peft_base, kind, tmp / name, seed=seed, scale=0.3)
        loaded[name] = read_adapter(tmp / name, ours, limits)

    def mix(*pairs):
        return mix_adapters([MixMember(n, loaded[n], w) for n, w in pairs], limits.max_rank)

    slots = {MIX: mix(("a", 0.7), ("b", 0.3)), A: loaded["a"], B: loaded["b"], M1: loaded["m1"],
             MISS_MIX: mix(("m1", 0.7), ("m2", 0.3)), LORA_MISS: mix(("a", 0.6), ("mini", -0.4)),
             BAT_MIX: mix(("bat1", 0.5), ("bat2", 0.8))}
    for slot, adapter in slots.items():
        layers.load_slot(slot, adapter)
    return tmp, peft_base, ours.model, loaded, slots


def _forward(model, ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(rows, ids.shape[1])):
        return model(input_ids=ids).logits


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, af.VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _peft_cat(tmp, peft_base):
    """PEFT's own 0.7/0.3 mix of a and b (`cat`), plus each member alone, in one PeftModel."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(peft_base.model), str(tmp / "a"), adapter_name="a")
    model.load_adapter(str(tmp / "b"), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    return model.eval()


def _peft_logits(model, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_alone(tmp, peft_base, name: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(peft_base.model), str(tmp / name)).eval()


@pytest.mark.parametrize("length", [12, 5], ids=["prefill-segments", "short-grouped"])
def test_cat_mix_in_a_mixed_batch_matches_peft(zoo, length):
    tmp, peft_base, model, _, _ = zoo
    rows = [MIX, A, B, BASE, M1, MIX]
    ids = _ids(len(rows), length, seed=length)
    got = _forward(model, ids, rows)
    peft = _peft_cat(tmp, peft_base)
    miss = _peft_alone(tmp, peft_base, "m1")
    with torch.no_grad():
        base = peft_base.model(input_ids=ids).logits
        miss_logits = miss(input_ids=ids).logits
    expected = {MIX: _peft_logits(peft, "mix", ids), A: _peft_logits(peft, "a", ids),
                B: _peft_logits(peft, "b", ids), BASE: base, M1: miss_logits}
    for i, slot in enumerate(rows):
        torch.testing.assert_close(got[i], expected[slot][i], atol=1e-4, rtol=1e-4)
    for member in (A, B, BASE):
        assert (expected[MIX][0] - expected[member][0]).abs().max() > 1e-2, "the mix must differ from each part"


def test_cat_mix_greedy_decode_matches_peft_generate(zoo):
    tmp, peft_base, model, _, _ = zoo
    rows = [MIX, A, BASE, M1]
    ids, steps = _ids(len(rows), 6, seed=9), 8
    out = af.greedy_mixed_decode(model, ids, rows, steps)
    peft = _peft_cat(tmp, peft_base)
    peft.set_adapter("mix")
    with torch.no_grad():
        expected = af.peft_greedy(peft, ids[:1], steps)
    assert torch.equal(out[:1], expected)


def test_miss_mix_is_the_weighted_sum_of_the_blocks_run_by_peft(zoo):
    """Same mode, same r: one block of rank r (not 2r), and PEFT running that block gives the logits."""
    tmp, peft_base, model, _, slots = zoo
    mixed = slots[MISS_MIX]
    assert mixed.rank == 12 and all(isinstance(w, MissWeights) for w in mixed.modules.values())
    from safetensors.torch import load_file

    peft = _peft_alone(tmp, peft_base, "m1")
    other = load_file(tmp / "m2" / "adapter_model.safetensors")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "miss_block" in name:
                key = name.replace(".default", "")
                p.copy_(0.7 * p + 0.3 * other[key])
    ids = _ids(3, 7, seed=2)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
    torch.testing.assert_close(_forward(model, ids, [MISS_MIX] * 3), expected, atol=1e-4, rtol=1e-4)


def _merged_delta_reference(tmp, peft_base, parts: list[tuple[str, float]]):
    """The base with W += Σ w·ΔW, each ΔW from PEFT's own merge of that member (merge_and_unload)."""
    reference = copy.deepcopy(peft_base.model)
    base_params = dict(peft_base.model.named_parameters())
    with torch.no_grad():
        for name, weight in parts:
            merged = dict(_peft_alone(tmp, peft_base, name).merge_and_unload().named_parameters())
            for key, p in reference.named_parameters():
                p.add_(weight * (merged[key] - base_params[key]))
    return reference


@pytest.mark.parametrize("slot,parts", [(LORA_MISS, [("a", 0.6), ("mini", -0.4)]),
                                        (BAT_MIX, [("bat1", 0.5), ("bat2", 0.8)])], ids=["lora+miss", "bat"])
def test_mixes_peft_cannot_build_equal_the_weighted_sum_of_peft_deltas(zoo, slot, parts):
    tmp, peft_base, model, _, slots = zoo
    reference = _merged_delta_reference(tmp, peft_base, parts)
    ids = _ids(3, 7, seed=slot)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        base = peft_base.model(input_ids=ids).logits
    got = _forward(model, ids, [slot, BASE, slot])
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], atol=1e-4, rtol=1e-4)
    assert (expected - base).abs().max() > 1e-2
    q = slots[slot].modules["model.layers.0.self_attn.q_proj"]  # both members adapt it
    assert isinstance(q, LoraWeights if slot == LORA_MISS else BatWeights)


def test_targets_are_the_union_and_ranks_add_where_members_meet(zoo):
    _, _, _, loaded, slots = zoo
    mixed = slots[MIX]
    assert set(mixed.modules) == set(loaded["a"].modules) | set(loaded["b"].modules)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert mixed.modules[q].rank == 16 and mixed.modules[v].rank == 8
    assert mixed.modules["model.embed_tokens"].embedding and mixed.rank == 16 and mixed.variant == "mix"


def test_one_member_with_a_weight_is_that_adapter_scaled(zoo):
    _, _, _, loaded, _ = zoo
    one = mix_adapters([MixMember("a", loaded["a"], 0.25)], max_rank=32)
    q = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(one.modules[q].bt, 0.25 * loaded["a"].modules[q].bt)
    torch.testing.assert_close(one.modules[q].a, loaded["a"].modules[q].a)


def test_refusals_name_the_reason(zoo):
    _, _, _, loaded, _ = zoo

    def mix(*pairs, max_rank=32):
        return mix_adapters([MixMember(n, loaded[n], w) for n, w in pairs], max_rank)

    with pytest.raises(AdapterError, match="'dora' is a DoRA adapter, which cannot be mixed"):
        mix(("a", 0.5), ("dora", 0.5))
    with pytest.raises(AdapterError, match=r"'head' carries whole-module copies \(modules_to_save: lm_head\)"):
        mix(("a", 0.5), ("head", 0.5))
    with pytest.raises(AdapterError, match="summed rank is 16 .* over the configured maximum rank 12"):
        mix(("a", 0.5), ("b", 0.5), max_rank=12)
    with pytest.raises(AdapterError, match="bat adapter mixes only with bat adapters of the same r"):
        mix(("bat1", 0.5), ("m1", 0.5))  # both adapt q_proj
    with pytest.raises(InvalidRequest, match="'a' is listed twice"):
        mix(("a", 0.5), ("a", 0.5))
    with pytest.raises(InvalidRequest, match="weights must be finite"):
        mix(("a", float("nan")))
    with pytest.raises(InvalidRequest, match=f"1 to {MAX_MIX_MEMBERS} members, got 0"):
        mix()
    with pytest.raises(AdapterError, match="overflows float32"):
        mix(("a", 3e38), ("b", 3e38))
    with pytest.raises(AdapterError, match="torch.float16 adapter slots hold"):
        mix_adapters([MixMember("a", loaded["a"], 1e6)], 32, slot_dtype=torch.float16)
    assert mix_adapters([MixMember("a", loaded["a"], 1e6)], 32).rank == 8  # float32 slots hold it

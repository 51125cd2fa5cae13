"""Merge recipes (merge/recipes.py) against PEFT's own `add_weighted_adapter`, combination by combination.

Two LoRA members of one rank with different targets (q/v, and embed_tokens/q):
the stored tensors of our recipe must equal PEFT's new adapter's, and the adapter
PEFT loads from our files must give PEFT's logits. DARE is random: PEFT draws from
the global generator, so its run is seeded where its merge starts (after it
initialised the new adapter's layers); ours from the recipe's seed.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.merge.recipes import COMBINATIONS, Recipe, read_member, write_recipe
from server.errors import AdapterError, InvalidRequest

WEIGHTS = (0.7, -0.4)
SEED = 1234


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    base = af.tiny_base(0)
    for name, kind, seed in (("a", "lora_qv", 80), ("b", "lora_embed", 81), ("c", "lora_all", 82),
                             ("d", "dora_qv", 83), ("m", "miss_balance", 84),
                             ("h", "mts_head", 85)):
        af.make_peft(base, kind, tmp / name, seed=seed, scale=0.3)
    return tmp, base


def _peft(tmp, base, combination: str, density: float | None, method: str = "total"):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(tmp / "a"), adapter_name="a")
    model.load_adapter(str(tmp / "b"), adapter_name="b")
    lora = model.base_model
    inject = lora.inject_adapter

    def seeded(*args, **kwargs):  # the merge's draws start from SEED, as ours do
        inject(*args, **kwargs)
        torch.manual_seed(SEED)

    lora.inject_adapter = seeded
    model.add_weighted_adapter(["a", "b"], list(WEIGHTS), "mix", combination_type=combination, density=density,
                               majority_sign_method=method)
    model.set_adapter("mix")
    return model.eval()


def _ours(tmp, base, combination: str, density: float | None, method: str | None = None):
    limits = AdapterLimits(max_rank=32)
    recipe = Recipe(combination, WEIGHTS, density=density, majority_sign_method=method,
                    seed=SEED if combination.startswith("dare") else None)
    out = tmp / f"out-{combination}-{method}"
    out.mkdir(exist_ok=True)
    write_recipe([read_member(n, tmp / n, limits) for n in ("a", "b")], recipe, base.model, out)
    return out


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_recipe_equals_peft_add_weighted_adapter(members, combination):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    tmp, base = members
    density = 0.5 if combination not in ("cat", "linear") else None
    peft = _peft(tmp, base, combination, density)
    out = _ours(tmp, base, combination, density)
    expected = {k: v for k, v in get_peft_model_state_dict(peft, adapter_name="mix").items() if "lora_" in k}
    got = load_file(out / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, atol=1e-6, rtol=1e-6, msg=key)
    ids = af.token_ids(5)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base.model), str(out)).eval()
    with torch.no_grad():
        want, have, plain = peft(input_ids=ids).logits, loaded(input_ids=ids).logits, base.model(input_ids=ids).logits
    torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
    assert (want - plain).abs().max() > 1e-3, "the recipe must change the output"


def test_frequency_sign_election_and_dare_reproducible(members):
    from safetensors.torch import load_file

    tmp, base = members
    from peft import get_peft_model_state_dict

    peft = _peft(tmp, base, "ties", 0.6, method="frequency")
    got = load_file(_ours(tmp, base, "ties", 0.6, "frequency") / "adapter_model.safetensors")
    for key, tensor in get_peft_model_state_dict(peft, adapter_name="mix").items():
        if "lora_" in key:
            torch.testing.assert_close(got[key], tensor, atol=1e-6, rtol=1e-6)
    first = load_file(_ours(tmp, base, "dare_ties", 0.5) / "adapter_model.safetensors")
    again = load_file(_ours(tmp, base, "dare_ties", 0.5) / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    config = json.loads((tmp / "out-dare_ties-None" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["use_rslora"]


def test_refusals(members):
    tmp, base = members
    limits = AdapterLimits(max_rank=32)
    a, c = read_member("a", tmp / "a", limits), read_member("c", tmp / "c", limits)
    with pytest.raises(AdapterError, match="'dora' is a DoRA adapter"):
        read_member("dora", tmp / "d", limits)
    with pytest.raises(AdapterError, match="'m' is a MISS adapter"):
        read_member("m", tmp / "m", limits)
    with pytest.raises(AdapterError, match="'h' carries whole-module copies"):
        read_member("h", tmp / "h", limits)
    with pytest.raises(AdapterError, match="needs members of one rank"):  # c: r 8 with a rank_pattern up to 12
        write_recipe([a, c], Recipe("ties", (0.5, 0.5), density=0.5), base.model, tmp)
    for recipe, message in [
        (Recipe("dare_linear", (1.0, 1.0), density=0.5), "seed is required"),
        (Recipe("ties", (1.0, 1.0)), "density is required"),
        (Recipe("cat", (1.0, 1.0), density=0.5), "density is required with .* and only then"),
        (Recipe("linear", (1.0, 1.0), seed=3), "seed is required .* and only then"),
        (Recipe("svd", (1.0, 1.0)), "'svd' is not offered"),
        (Recipe("ties", (1.0, 1.0), density=1.5), r"density must be in \(0, 1\]"),
        (Recipe("linear", (1.0, 1.0), majority_sign_method="total"), "applies to ties, dare_ties only"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            write_recipe([a, a], recipe, base.model, tmp)

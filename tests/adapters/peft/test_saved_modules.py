"""modules_to_save in PEFT's files: what is read (and how tied bases are handled), and every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.errors import AdapterError

HEAD_KEY = "base_model.model.lm_head.weight"
EMBED_KEY = "base_model.model.model.embed_tokens.weight"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    bases = {tie: af.tiny_base(0, tie_word_embeddings=tie) for tie in (True, False)}
    for tie, base in bases.items():
        for kind in ("mts_head", "mts_embed", "mts_both_tied", "lora_embed"):
            af.make_peft(base, kind, tmp / f"{kind}-{tie}")
    return bases, tmp


@pytest.fixture
def fresh(originals, tmp_path):
    bases, src = originals

    def copy(kind: str, tie: bool = True) -> Path:
        dst = tmp_path / f"{kind}-{tie}"
        shutil.copytree(src / f"{kind}-{tie}", dst)
        return dst

    return bases, copy


def _read(path: Path, base, **settings):
    return read_adapter(path, base, AdapterLimits.from_settings(af.adapter_settings(path.parent, **settings)))


def refused(path: Path, base, match: str, **settings) -> None:
    with pytest.raises(AdapterError, match=match) as err:
        _read(path, base, **settings)
    assert err.value.status == 422


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_copies_are_read_as_peft_saved_them(fresh, tie):
    bases, copy = fresh
    head = _read(copy("mts_head", tie), bases[tie])
    assert head.saved.names() == ("lm_head",) and head.saved.copies == 1
    assert head.summary()["modules_to_save"] == ["lm_head"]
    assert head.nbytes == head.saved.nbytes + sum(w.nbytes for w in head.modules.values())
    assert _read(copy("mts_embed", tie), bases[tie]).saved.names() == ("model.embed_tokens",)
    both = _read(copy("mts_both_tied", tie), bases[tie]).saved
    assert both.names() == ("lm_head", "model.embed_tokens")
    # ensure_weight_tying: one copy for both modules on a tied base (PEFT's), two on an untied one
    assert both.copies == (1 if tie else 2)
    assert (both.weights["lm_head"] is both.weights["model.embed_tokens"]) == tie


def test_tied_copy_saved_under_one_key_serves_both(fresh):
    bases, copy = fresh
    path = copy("mts_both_tied")
    af.edit_tensors(path, lambda t: {k: v for k, v in t.items() if k != HEAD_KEY})
    assert _read(path, bases[True]).saved.copies == 1


CASES = [
    ("mts_head", {"modules_to_save": ["lm_head", "nothing_here"]}, None,
     "modules_to_save entry 'nothing_here' matches no module of the base model"),
    ("mts_head", {"modules_to_save": ["post_attention_layernorm"]}, None,
     r"selects module 'model.layers.0.post_attention_layernorm', which cannot be replaced whole here: only the "
     r"input embedding and the output head can \(lm_head, model.embed_tokens\)"),
    ("mts_head", {"modules_to_save": ["lm_head", "q_proj"]}, None, r"selects module 'model.layers.0.self_attn.q_proj'"),
    ("mts_head", {"modules_to_save": "lm_head"}, None, "modules_to_save must be a list of module names"),
    ("lora_embed", {"modules_to_save": ["embed_tokens"]}, None,
     "module 'model.embed_tokens' is both adapted .target_modules. and replaced whole .modules_to_save."),
    ("lora_embed", {"ensure_weight_tying": True}, None,
     r"ensure_weight_tying with a LoRA on the tied input embedding \(PEFT then adapts lm_head with it\)"),
    ("mts_embed", {"ensure_weight_tying": True}, None, "ensure_weight_tying is a LoRA option"),
    ("mts_head", {}, lambda t: {k: v for k, v in t.items() if k != HEAD_KEY},
     r"modules_to_save: module 'lm_head' has no weight \(base_model.model.lm_head.weight\)"),
    ("mts_head", {}, lambda t: {**t, HEAD_KEY: t[HEAD_KEY][:4000]},
     r"has shape \[4000, 64\] but module 'lm_head' of the base model has \[4096, 64\] \(a resized vocabulary"),
    ("mts_head", {}, lambda t: {**t, "base_model.model.lm_head.bias": torch.zeros(4096)},
     "unexpected tensor 'base_model.model.lm_head.bias'"),
    ("mts_head", {}, lambda t: {**t, HEAD_KEY: t[HEAD_KEY].index_fill(0, torch.tensor([7]), float("nan"))},
     "tensor 'base_model.model.lm_head.weight' contains NaN or Inf"),
    ("mts_head", {}, lambda t: {**t, HEAD_KEY: t[HEAD_KEY].to(torch.int32)}, "must be floating point"),
    ("mts_both_tied", {}, lambda t: {**t, HEAD_KEY: t[HEAD_KEY] + 1},
     "ensure_weight_tying: the saved copies of 'lm_head' and 'model.embed_tokens' differ"),
]


@pytest.mark.parametrize("kind,config,tensors,message", CASES, ids=[c[3][:40] for c in CASES])
def test_refusals_name_the_reason(fresh, kind, config, tensors, message):
    bases, copy = fresh
    path = copy(kind)
    if config:
        af.edit_config(path, **config)
    if tensors:
        af.edit_tensors(path, tensors)
    refused(path, bases[True], message)


def test_copies_past_the_budget_are_refused_with_the_numbers(fresh):
    """One copy of the tiny head is 1 MiB (4096 × 64 float32): a 1 MiB budget holds one, not two."""
    bases, copy = fresh
    untied = copy("mts_both_tied", tie=False)
    refused(untied, bases[False], r"brings 2 whole-module copies \(lm_head, model.embed_tokens\) of 1.0 MiB each on "
            r"this model; the module-copy budget of 1 MiB \(module_copy_budget_mb\) holds 1: it needs at least 2 MiB",
            module_copy_budget_mb=1)
    assert _read(copy("mts_head", tie=False), bases[False], module_copy_budget_mb=1).saved.copies == 1
    refused(copy("mts_head"), bases[True], "module-copy budget of 0 MiB", module_copy_budget_mb=0)

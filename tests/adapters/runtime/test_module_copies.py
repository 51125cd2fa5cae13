"""modules_to_save served unmerged, against PEFT itself: whole-module copies of lm_head / embed_tokens.

PEFT writes each adapter (its copies fine-tuned away from the base), our reader loads it,
its copies go to rows of the module-copy pool, and every row of a mixed batch (a head-saving
LoRA, an embedding-saving MiSS, a LoRA on the embedding, a plain MiSS, an adapter saving
both with ensure_weight_tying, base rows) must give the logits of PEFT running that row
alone (1e-4, float32) and PEFT's greedy tokens, on a tied base and on an untied one.
"""

from __future__ import annotations

import pytest
import torch

from tests.adapters import adapter_factory as af
from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step

KINDS = ["mts_head", "mts_embed", "lora_embed", "miss_balance", "mts_both_tied"]
BASE = -1


def _load_all(tmp, tie: bool):
    settings = af.adapter_settings(tmp, max_adapters_resident=len(KINDS))
    limits = AdapterLimits.from_settings(settings)
    reference, ours = af.tiny_base(0, tie_word_embeddings=tie), af.tiny_base(0, tie_word_embeddings=tie)
    layers = inject_adapter_layers(ours.model, limits)
    peft_models, row = {}, 0
    for slot, kind in enumerate(KINDS):
        peft_models[slot] = af.make_peft(reference, kind, tmp / kind, seed=60 + slot)
        adapter = read_adapter(tmp / kind, ours, limits)
        rows = tuple(range(row, row + adapter.saved.copies))
        row += len(rows)
        layers.load_slot(slot, adapter, rows)
    return ours, peft_models, layers


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def served(request, tmp_path_factory):
    return (request.param, *_load_all(tmp_path_factory.mktemp("mts"), request.param))


def _forward(model, ids: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(row_slots, ids.shape[1])):
        return model(input_ids=ids).logits


ROWS = [0, BASE, 1, 2, 4, 3, 0, BASE, 4, 1]


def test_pool_holds_one_copy_per_distinct_module_copy(served):
    tie, ours, _, layers = served
    pool = layers.copies
    assert pool is not None and set(pool.held) == {"model.embed_tokens", "lm_head"}
    assert pool.held["lm_head"].keys() == {0, 4} and pool.held["model.embed_tokens"].keys() == {1, 4}
    tied_rows = (pool.held["lm_head"][4], pool.held["model.embed_tokens"][4])
    assert (tied_rows[0] == tied_rows[1]) == tie, "ensure_weight_tying shares one copy on a tied base only"
    assert pool.row_of["lm_head"].tolist()[-2:] == [-1, -1]  # TRAIN_SLOT, BASE_SLOT read no copy


@pytest.mark.parametrize("length", [12, 5], ids=["prefill-segments", "short-grouped"])
def test_mixed_batch_matches_peft_row_by_row(served, length):
    _, ours, peft_models, _ = served
    ids = torch.randint(3, af.VOCAB, (len(ROWS), length), generator=torch.Generator().manual_seed(length))
    got = _forward(ours.model, ids, ROWS)
    base = _forward(ours.model, ids, [BASE] * len(ROWS))
    for i, slot in enumerate(ROWS):
        if slot == BASE:
            torch.testing.assert_close(got[i:i + 1], base[i:i + 1], atol=1e-4, rtol=1e-4)
            continue
        with torch.no_grad():
            expected = peft_models[slot](input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(got[i:i + 1], expected, atol=1e-4, rtol=1e-4)
        assert (expected - base[i:i + 1]).abs().max() > 1e-2, "the adapter must change the output"
        assert torch.equal(got[i:i + 1].argmax(-1), expected.argmax(-1))


def test_greedy_mixed_decode_matches_peft_generate(served):
    """Prefill then one-token steps of a mixed batch, as the engine runs them (a KV cache)."""
    _, ours, peft_models, _ = served
    rows = [0, 1, BASE, 4, 2]
    ids = torch.randint(3, af.VOCAB, (len(rows), 6), generator=torch.Generator().manual_seed(9))
    out = af.greedy_mixed_decode(ours.model, ids, rows)
    changed = 0
    for i, slot in enumerate(rows):
        if slot == BASE:
            continue
        kw = dict(input_ids=ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), max_new_tokens=6,
                  min_new_tokens=6, do_sample=False, pad_token_id=af.EOS, eos_token_id=None)
        expected = peft_models[slot].generate(**kw)
        assert torch.equal(out[i:i + 1], expected), f"row {i} (slot {slot})"
        with peft_models[slot].disable_adapter():
            changed += not torch.equal(peft_models[slot].generate(**kw), expected)
    assert changed, "the adapters must change the greedy tokens"


def test_slot_reused_by_a_plain_adapter_reads_the_base_module(tmp_path):
    """A slot whose copy-holding adapter was replaced serves the new adapter on the base head."""
    settings = af.adapter_settings(tmp_path, max_adapters_resident=1)
    limits = AdapterLimits.from_settings(settings)
    reference, ours = af.tiny_base(0), af.tiny_base(0)
    layers = inject_adapter_layers(ours.model, limits)
    af.make_peft(reference, "mts_head", tmp_path / "h", seed=1)
    lora = af.make_peft(reference, "lora_qv", tmp_path / "l", seed=2)
    layers.load_slot(0, read_adapter(tmp_path / "h", ours, limits), (0,))
    layers.load_slot(0, read_adapter(tmp_path / "l", ours, limits))
    assert layers.copies is not None and not layers.copies.held["lm_head"]
    ids = af.token_ids(3)
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    torch.testing.assert_close(af.logits_under(ours.model, ids, 0), expected, atol=1e-4, rtol=1e-4)


def test_peft_reload_of_the_saved_files_matches(tmp_path):
    """The files PEFT saved, loaded back by PEFT (not the in-memory model): the same logits as ours."""
    from peft import PeftModel

    ours, _, _ = _load_all(tmp_path, tie=True)
    ids = af.token_ids(5)
    for slot in (0, 1, 4):
        loaded = PeftModel.from_pretrained(af.tiny_base(0, tie_word_embeddings=True).model, tmp_path / KINDS[slot])
        with torch.no_grad():
            expected = loaded.eval()(input_ids=ids).logits
        torch.testing.assert_close(af.logits_under(ours.model, ids, slot), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_batch_matches_peft(tmp_path):
    """The pool on the GPU (copies staged through the copy stream), the Triton backend beside it, vs PEFT there."""
    import dataclasses

    settings = af.adapter_settings(tmp_path, max_adapters_resident=len(KINDS))
    limits = AdapterLimits.from_settings(settings)
    reference, ours = af.tiny_base(0, tie_word_embeddings=False), af.tiny_base(0, tie_word_embeddings=False)
    ours.model.to("cuda")
    ours = dataclasses.replace(ours, device=torch.device("cuda"))
    layers = inject_adapter_layers(ours.model, limits)
    peft_models, row = {}, 0
    for slot, kind in enumerate(KINDS):
        peft_models[slot] = af.make_peft(reference, kind, tmp_path / kind, seed=60 + slot).to("cuda")
        adapter = read_adapter(tmp_path / kind, ours, limits)
        layers.load_slot(slot, adapter, tuple(range(row, row + adapter.saved.copies))).order_before_compute()
        row += adapter.saved.copies
    layers.copier.join()
    ids = torch.randint(3, af.VOCAB, (len(ROWS), 5), generator=torch.Generator().manual_seed(5)).to("cuda")
    with torch.no_grad(), adapter_step(AdapterMapping.from_row_slots(ROWS, ids.shape[1], "cuda")):
        got = ours.model(input_ids=ids).logits
    for i, slot in enumerate(ROWS):
        if slot != BASE:
            with torch.no_grad():
                expected = peft_models[slot](input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], expected, atol=1e-4, rtol=1e-4)


def test_only_a_plain_embedding_lookup_is_copyable():
    """Gemma 3's embedding rescales its rows in its forward: a gather of a copy would skip that, so only
    its head may be saved; a Llama offers both."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from server.adapters.runtime.inject import copy_modules

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16))
    assert list(copy_modules(gemma)) == ["lm_head"]
    assert sorted(copy_modules(af.tiny_base(0).model)) == ["lm_head", "model.embed_tokens"]

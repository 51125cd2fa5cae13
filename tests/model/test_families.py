"""The supported-architecture matrix, served through the real engine, exact in float32.

For every family: tiny random model saved to disk and loaded by load_base,
served by an Engine with a small token budget (prefills are chunked, chunks
cross the sliding window), several requests at once — base rows, an all-linear
LoRA row and a MiSS row in the same steps — each compared token for token
against transformers' greedy `generate` (base) or PEFT's (adapter rows), with
prompts and generations far longer than the window.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.peft.peft_format import read_adapter
from server.engine.engine import Engine
from server.engine.prefix_cache import BLOCK_TOKENS
from server.engine.runner import RunnerOptions
from bench.engine_requests import generate
from server.engine.request import SamplingParams
from server.model.families import FAMILIES as SUPPORTED
from server.model.families import UnsupportedModel
from server.model.load import load_base
from server.settings import Settings
from tests.harness import FixedSlots, cpu_settings
from tests.model import family_factory as ff

NEW_TOKENS = 14
PROMPT_LENGTHS = (23, 5, 17, 30)  # the 5-token prompt's generation crosses the window during decode
KEYS = (None, "lora", "miss", None)  # row i runs under KEYS[i]



def test_the_matrix_is_the_supported_list():
    assert set(ff.FAMILIES) == set(SUPPORTED)


@pytest.fixture(scope="module", params=sorted(ff.FAMILIES))
def family(request, tmp_path_factory, embedded_model_dir):
    model_type = request.param
    tmp = tmp_path_factory.mktemp(model_type)
    reference = ff.build_family(model_type)
    ff.save_family(model_type, tmp / "model", embedded_model_dir)
    peft = {"lora": ff.make_adapter(reference, "lora", tmp / "lora", model_type, seed=3),
            "miss": ff.make_adapter(reference, "miss", tmp / "miss", model_type, seed=4)}
    return model_type, tmp, reference, peft


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, ff.VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


async def _serve_all(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    done = await asyncio.gather(*(generate(engine, ids, params, adapter_key=key, timeout_s=60)
                                  for ids, key in zip(prompts, KEYS)))
    return [choices[0] for choices in done]


@pytest.mark.parametrize("budget", [512, 16], ids=["whole-prefill", "chunked-prefill"])
def test_family_matches_transformers_and_peft_in_a_mixed_batch(family, budget):
    _check_family(family, budget, None)


def test_family_in_the_static_decode_layout_matches_transformers_and_peft(family):
    """CUDA's graph-ready decode layout (padded batch, rows gathered, keys to a 256 bucket, windows as masks)
    run on CPU: the same tokens."""
    _check_family(family, 16, RunnerOptions(static_decode=True, buckets=(2, 8)))


def _check_family(family, budget: int, options: RunnerOptions | None, prompts: list[list[int]] | None = None,
                  rounds: int = 1) -> Engine:
    model_type, tmp, reference, peft = family
    settings = cpu_settings(tmp / "model", tmp / "store",
                            max_batch=4, max_tokens_per_step=budget, max_adapters_resident=2, max_rank=16)
    base = load_base(settings)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    for slot, kind in enumerate(("lora", "miss")):
        layers.load_slot(slot, read_adapter(tmp / kind, base, AdapterLimits.from_settings(settings)))
    engine = Engine(base, settings, placement=FixedSlots({"lora": 0, "miss": 1}), runner_options=options)
    engine.eos_ids = frozenset()
    engine.start()
    prompts = prompts or _prompts(seed=len(model_type))
    try:
        got = [asyncio.run(_serve_all(engine, prompts)) for _ in range(rounds)]
    finally:
        engine.stop()
    for ids, key, *tokens in zip(prompts, KEYS, *got):
        expected = ff.greedy(reference if key is None else peft[key], ids, NEW_TOKENS)
        assert all(t == expected for t in tokens), f"{model_type} {key or 'base'} prompt of {len(ids)}"
    return engine


def test_family_reuses_cached_prompt_prefixes_exactly(family):
    """A prefix far longer than the window, cached in the first round and copied into rows in the second
    (chunked prefill from the cached position): still transformers' and PEFT's tokens."""
    shared = _prompts(seed=99)[3] + _prompts(seed=98)[3] + _prompts(seed=97)[3]  # 90 tokens: 2 full blocks
    prompts = [shared + tail for tail in _prompts(seed=7)]
    engine = _check_family(family, 16, None, prompts, rounds=2)
    assert engine.stats()["prefix_hit_tokens"] >= 4 * 2 * BLOCK_TOKENS  # at least the second round, all 4 rows


def test_unsupported_architecture_is_refused_at_start_listing_the_families(tmp_path, embedded_model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel) as e:
        load_base(cpu_settings(tmp_path))
    assert "'gpt2' is not supported" in str(e.value)
    assert all(f.model_type in str(e.value) for f in SUPPORTED.values())


def test_unknown_attention_feature_is_refused_at_start(tmp_path, embedded_model_dir):
    """Llama 4's chunked attention, set on a Llama config: the engine does not implement it."""
    ff.save_family("llama", tmp_path, embedded_model_dir, attention_chunk_size=8)
    with pytest.raises(UnsupportedModel, match="attention_chunk_size=8"):
        load_base(cpu_settings(tmp_path))


def test_adapter_for_another_family_names_this_models_modules(tmp_path, embedded_model_dir):
    """A Llama-style adapter (q_proj, v_proj) on Phi-3, whose attention is one fused qkv_proj."""
    from peft import LoraConfig, get_peft_model

    from server.errors import AdapterError

    get_peft_model(ff.build_family("llama"), LoraConfig(target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "a")
    settings = Settings(model=str(ff.save_family("phi3", tmp_path / "phi3", embedded_model_dir)), device="cpu",
                        dtype="float32", store=tmp_path / "store")
    with pytest.raises(AdapterError, match="adaptable modules are named .*gate_up_proj.*qkv_proj"):
        read_adapter(tmp_path / "a", load_base(settings), AdapterLimits.from_settings(settings))

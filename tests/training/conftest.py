"""Training fixtures: the tiny Llama loaded as the server loads it, with adapter layers injected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.runtime.mapping import AdapterMapping
from server.adapters.runtime.step import adapter_step
from server.model.load import BaseModel, load_base
from server.settings import Settings
from server.training.data import tokenize_all
from server.training.spec import TrainingJobSpec
from server.training.trainer import Trainer
from tests.adapters.store.s3_moto import MotoS3, moto_s3
from tests.harness import cpu_settings

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def settings_for(model_dir: Path, store: Path, **overrides) -> Settings:
    return cpu_settings(model_dir, store, **{"max_rank": 32, "max_adapters_resident": 4, **overrides})


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    """A real S3-compatible server on loopback for the bucket-backed job queue (a bucket per test)."""
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def train_settings(tiny_model_dir, tmp_path_factory) -> Settings:
    return settings_for(tiny_model_dir, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def tiny_served(train_settings) -> BaseModel:
    """The tiny base as the server holds it: frozen, with adapter-aware wrappers injected."""
    base = load_base(train_settings)
    inject_adapter_layers(base.model, AdapterLimits.from_settings(train_settings))
    return base


def make_spec(**kw) -> TrainingJobSpec:
    defaults = dict(adapter_id="t", rank=8, steps=10, learning_rate=1e-2, batch_size=2, seed=0,
                    data=[{"prompt": "Say hi:", "completion": " Ahoy matey!"},
                          {"prompt": "Sky colour?", "completion": " Blue as the briny deep, arr."}])
    defaults.update(kw)
    return TrainingJobSpec(**defaults)


def make_trainer(base: BaseModel, spec: TrainingJobSpec) -> Trainer:
    examples = tokenize_all(spec.data, base.tokenizer, 256)
    return Trainer(base.model, spec, examples, base.tokenizer.pad_token_id, base.device, base.dtype)


def served_logits(base: BaseModel, ids: torch.Tensor, slot: int) -> torch.Tensor:
    """Our serving path: the wrappers with an adapter in device `slot` (ids [1, L] → [1, L, V])."""
    mapping = AdapterMapping.from_token_slots([slot] * ids.shape[1], base.device)
    with torch.inference_mode(), adapter_step(mapping):
        return base.model(input_ids=ids, use_cache=False).logits.clone()


def greedy(base: BaseModel, prompt_ids: list[int], n: int, slot: int) -> list[int]:
    """Greedy continuation by full recomputation (tiny model: fast enough, no KV cache involved)."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits = served_logits(base, torch.tensor([ids], device=base.device), slot)
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == base.tokenizer.eos_token_id:
            break
    return ids[len(prompt_ids):]


def assert_served_like_peft(base: BaseModel, out: Path, settings: Settings, peft_model) -> None:
    """The exported adapter in `out`, served by our wrappers, gives PEFT's greedy tokens on "Say hi:" (and the
    base's differ: training changed something). Injects the adapter layers into `base` if not yet there."""
    from server.adapters.peft.peft_format import read_adapter

    prompt = base.tokenizer("Say hi:")["input_ids"]
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    layers.load_slot(3, read_adapter(out, base, AdapterLimits.from_settings(settings)))
    try:
        ours = greedy(base, prompt, 12, slot=3)
    finally:
        layers.clear_slot(3)
    plain = greedy(base, prompt, 12, slot=-1)
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                     pad_token_id=base.tokenizer.eos_token_id,
                                     eos_token_id=base.tokenizer.eos_token_id)[0, len(prompt):].tolist()
    assert ours == theirs
    assert ours != plain, "training must change the greedy tokens for this test to mean anything"

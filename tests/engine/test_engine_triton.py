"""Engine steps through TritonBackend equal the same steps through TorchBackend.

Several adapters and the base at once, prompts of different lengths (prefill segments) then
decode (one token per sequence, two sequences on one adapter): greedy tokens must be the same.
On CPU the kernels run on Triton's interpreter; `-m cuda` runs them compiled on a GPU.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from server.adapters.limits import AdapterLimits
from server.adapters.peft.peft_format import read_adapter
from server.adapters.runtime.backend import AdapterBackend, TorchBackend
from server.adapters.runtime.inject import inject_adapter_layers
from bench.engine_requests import generate
from server.engine.request import SamplingParams
from server.model.load import BaseModel, load_base
from server.settings import Settings

from tests.adapters import adapter_factory as af
from tests.harness import FixedSlots

KINDS = {"all": "lora_all", "qv": "lora_qv", "miss": "miss_balance"}  # key -> kind; slot = order
PROMPTS = [("all", "Hello there, how are"), ("qv", "The weather today"), ("miss", "One two three four five six"),
           (None, "Plain base model text"), ("all", "Another one")]
NEW_TOKENS = 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



@pytest.fixture(scope="module")
def adapter_dirs(varied_base, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("engine-triton")
    for seed, (key, kind) in enumerate(KINDS.items()):
        af.make_peft(varied_base, kind, tmp / key, seed=60 + seed, scale=0.5)
    return {key: tmp / key for key in KINDS}


def _greedy(make_engine, model_dir, adapter_dirs, device: str,
            backend: AdapterBackend | None) -> tuple[list[list[int]], AdapterBackend]:
    """Every prompt's greedy tokens from one engine whose model's adapter layers use `backend` (None: the
    one injection picks), and that backend."""
    base: BaseModel = load_base(Settings(model=str(model_dir), device=device, dtype="float32"))
    limits = AdapterLimits(max_adapters_resident=len(KINDS), max_rank=16)
    layers = inject_adapter_layers(base.model, limits, backend=backend)
    for slot, key in enumerate(KINDS):
        layers.load_slot(slot, read_adapter(adapter_dirs[key], base, limits))
    engine = make_engine(base=base, placement=FixedSlots({k: s for s, k in enumerate(KINDS)}), max_batch=8)

    async def together() -> list[list[int]]:
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        done = await asyncio.gather(*(generate(engine, base.tokenizer(text)["input_ids"], params, adapter_key=key,
                                               timeout_s=120) for key, text in PROMPTS))
        return [choices[0] for choices in done]

    return asyncio.run(together()), layers["model.layers.0.self_attn.q_proj"].backend


def test_engine_steps_equal_torch_backend(interpreted_triton_lora, make_engine, varied_model_dir, adapter_dirs,
                                         monkeypatch):
    from server.adapters.runtime.triton_backend import TritonBackend

    calls: list[int] = []
    add_lora = interpreted_triton_lora.add_lora
    monkeypatch.setattr(interpreted_triton_lora, "add_lora", lambda *a: calls.append(1) or add_lora(*a))
    got, _ = _greedy(make_engine, varied_model_dir, adapter_dirs, "cpu", TritonBackend())
    assert calls  # the steps went through the kernels
    want, _ = _greedy(make_engine, varied_model_dir, adapter_dirs, "cpu", TorchBackend())
    assert got == want
    assert len({tuple(t) for t in want}) > 1 and all(want)


@pytest.mark.cuda
@needs_cuda
def test_cuda_engine_steps_equal_torch_backend(make_engine, varied_model_dir, adapter_dirs):
    from server.adapters.runtime.triton_backend import TritonBackend

    got, picked = _greedy(make_engine, varied_model_dir, adapter_dirs, "cuda", None)
    want, _ = _greedy(make_engine, varied_model_dir, adapter_dirs, "cuda", TorchBackend())
    assert isinstance(picked, TritonBackend)
    assert got == want
    assert len({tuple(t) for t in want}) > 1 and all(want)

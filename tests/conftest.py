"""Shared fixtures: a tiny random Llama (fast) and the real embedded default model.

The tiny model uses the real SmolLM2 tokenizer (so chat templates and EOS are
realistic) with a 2-layer random Llama of hidden size 64. Both are built once
per test session; the embedded model's safetensors cache lives in the normal
user cache (`~/.cache/loraplex`) so it is converted only once per machine.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a
# shared, oversubscribed CPU, spinning 2-thread teams made a training step on the
# 135M model ~14x slower (244 s vs 18 s for 15 steps); server subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def _import_triton_interpreted() -> ModuleType | None:
    """Without CUDA, the adapter kernels (server/kernels/triton_lora.py) run on Triton's interpreter.

    Triton reads TRITON_INTERPRET as `@triton.jit` decorates, its own library's functions
    included, and torch imports Triton as soon as transformers loads: so the variable is set here,
    before any project import, for this import only (server subprocesses never see it). With
    CUDA nothing changes: the compiled kernels are tested there (`pytest -m cuda`)."""
    if torch.cuda.is_available() or "triton" in sys.modules:  # imported already: too late to interpret
        return None
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("server.kernels.triton_lora")
    except ImportError:
        return None
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_TRITON_LORA_INTERPRETED = _import_triton_interpreted()

from server.model.load import ensure_embedded_cache  # noqa: E402
from server.settings import Settings, default_cache_dir  # noqa: E402
from tests.harness import cpu_settings  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """Plain HF dir of SmolLM2-135M-Instruct (converted from the GGUF once)."""
    return ensure_embedded_cache(Path(os.environ.get("LORAPLEX_CACHE_DIR", default_cache_dir())))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """A 2-layer random Llama saved as a local HF model dir, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    # Random init gives near-uniform logits; scale up so greedy choices are
    # well separated (argmax ties would make token-equality tests flaky).
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, embedded_model_dir) -> Path:
    """The embedded model's architecture, random weights whose outputs depend on context (tests/harness.py)."""
    from tests.harness import build_varied_llama

    return build_varied_llama(tmp_path_factory.mktemp("varied-llama"), embedded_model_dir)


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path) -> Settings:
    return cpu_settings(tiny_model_dir, tmp_path / "store")


@pytest.fixture
def interpreted_triton_lora(monkeypatch) -> ModuleType:
    """server.kernels.triton_lora on Triton's interpreter (CPU only: see `_import_triton_interpreted`).
    The interpreter reads TRITON_INTERPRET again as it launches: set for the test's duration only."""
    if _TRITON_LORA_INTERPRETED is None:
        pytest.skip("Triton's interpreter runs only without CUDA (with it: `pytest -m cuda`), set up before "
                    "anything imports Triton")
    assert _TRITON_LORA_INTERPRETED.INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _TRITON_LORA_INTERPRETED

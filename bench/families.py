"""A row per supported model family: decode throughput of the engine, base and 16 adapters.

Why: the families differ in what the engine does per layer (sliding-window
masks, Gemma 2's soft-capped matmul attention, fused projections), so a
regression on one family would not show on SmolLM2. Each family is built at
one small random size from its config, served in process by the real Engine
(no HTTP), and decodes the same concurrent requests twice: all on the base,
then each request on its own of 16 resident LoRA adapters (rank 16,
all-linear). Numbers are tokens generated per second of wall time.

    python -m bench.families [--quick] [--families llama,gemma2]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bench.engine_requests import generate
from server.adapters.limits import AdapterLimits
from server.adapters.runtime.inject import inject_adapter_layers
from server.adapters.peft.peft_format import read_adapter
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.model.families import FAMILIES
from server.model.load import ensure_embedded_cache, load_base
from server.settings import Settings

ADAPTERS = 16
WINDOW = 64
SIZE = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
FEATURES = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "gemma2": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "phi3": dict(sliding_window=WINDOW),
}


class Slots:
    """The engine's adapter-manager protocol over adapters loaded into slots up front."""

    def acquire(self, key: int) -> int:
        return key

    def release(self, key: int) -> None:
        pass

    def lane_of(self, key: int) -> None:
        return None

    def pin(self, key: int) -> None:
        pass


def build(model_type: str, work: Path, tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SIZE, **FEATURES.get(model_type, {}))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(work / "model")
    _adapters(model, work)
    return work / "model"


def _adapters(model: torch.nn.Module, work: Path) -> None:
    """One PEFT save, then ADAPTERS copies with their own random factors (same names and shapes)."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
                   ).save_pretrained(work / "a0")
    tensors = load_file(work / "a0" / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for i in range(ADAPTERS):
        out = work / f"a{i}"
        out.mkdir(exist_ok=True)
        if i:
            (out / "adapter_config.json").write_text((work / "a0" / "adapter_config.json").read_text())
        save_file({k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in tensors.items()},
                  out / "adapter_model.safetensors")


async def _generate(engine: Engine, prompts: list[list[int]], keys: list[int | None], new_tokens: int) -> int:
    params = SamplingParams(max_new_tokens=new_tokens)
    done = await asyncio.gather(*(generate(engine, p, params, adapter_key=k) for p, k in zip(prompts, keys)))
    return sum(len(t) for choices in done for t in choices)


def measure(model_type: str, work: Path, tokenizer_dir: Path, requests: int, prompt_len: int,
            new_tokens: int) -> dict[str, float]:
    path = build(model_type, work, tokenizer_dir)
    settings = Settings(model=str(path), store=work / "store", device="cpu", dtype="float32", max_batch=requests,
                        max_adapters_resident=ADAPTERS, max_rank=16)
    base = load_base(settings)
    layers = inject_adapter_layers(base.model, AdapterLimits.from_settings(settings))
    for i in range(ADAPTERS):
        layers.load_slot(i, read_adapter(work / f"a{i}", base, AdapterLimits.from_settings(settings)))
    engine = Engine(base, settings, placement=Slots())
    engine.eos_ids = frozenset()  # every request runs its full length
    engine.start()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, SIZE["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(requests)]
    row: dict[str, float] = {}
    try:
        asyncio.run(_generate(engine, prompts[:2], [None, 0], 2))  # warm-up
        for label, keys in (("base", [None] * requests), ("16 adapters", [i % ADAPTERS for i in range(requests)])):
            t0 = time.perf_counter()
            tokens = asyncio.run(_generate(engine, prompts, keys, new_tokens))
            row[label] = tokens / (time.perf_counter() - t0)
    finally:
        engine.stop()
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 requests x 16 tokens (default 32 x 64)")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma list of model_types")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    requests, new_tokens = (16, 16) if a.quick else (32, 64)
    prompt_len = 2 * WINDOW  # past every window
    tokenizer_dir = ensure_embedded_cache(Settings().cache_dir)
    print(f"{requests} requests, prompt {prompt_len}, {new_tokens} new tokens, window {WINDOW}, "
          f"{torch.get_num_threads()} threads; tokens/s")
    print("| family | model_type | base | 16 adapters | ratio |\n| --- | --- | --- | --- | --- |")
    for model_type in a.families.split(","):
        with tempfile.TemporaryDirectory(prefix="loraplex-fam-") as tmp:
            row = measure(model_type, Path(tmp), tokenizer_dir, requests, prompt_len, new_tokens)
        base, adapted = row["base"], row["16 adapters"]
        print(f"| {FAMILIES[model_type].name} | `{model_type}` | {base:.0f} | {adapted:.0f} | {adapted / base:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()

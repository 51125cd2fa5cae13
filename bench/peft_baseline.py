"""What a user would write with PEFT alone: the baselines of scenario 2, and the reference outputs.

(a) `naive_loop`: a server loop that takes one request at a time, calls
`set_adapter` and `generate`. (b) `mixed_batches`: PEFT's own mixed-adapter
batch (`generate(..., adapter_names=[...])`) over static batches. Both run in
the bench process on the same weights and dtype the server uses, while the
server sits idle, so they never compete for the cores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from bench.adapters import AdapterSpec
from bench.load import GenRequest
from bench.model import BenchModel

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass
class PeftRun:
    name: str
    requests: int
    tokens: int
    wall_s: float
    texts: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, float | int | str]:
        return {"name": self.name, "requests": self.requests, "tokens": self.tokens,
                "wall_s": round(self.wall_s, 3), "tok_per_s": round(self.throughput, 2)}


@contextmanager
def peft_with(bm: BenchModel, specs: Sequence[AdapterSpec]) -> Iterator[PeftModel]:
    """The base wrapped by PEFT with every adapter in `specs` loaded under its id; unwrapped after."""
    first, *rest = specs
    model = PeftModel.from_pretrained(bm.model, str(first.path), adapter_name=first.adapter_id)
    for spec in rest:
        model.load_adapter(str(spec.path), adapter_name=spec.adapter_id)
    model.eval()
    try:
        yield model
    finally:
        model.unload()  # restores bm.model's own layers (no merge)


def _eos_ids(bm: BenchModel) -> set[int]:
    eos = bm.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if bm.tokenizer.eos_token_id is not None:
        ids.add(bm.tokenizer.eos_token_id)
    return ids


def _decode(bm: BenchModel, row: torch.Tensor, eos: set[int]) -> tuple[str, int]:
    """Text and token count of one generated row, stopping before the first EOS."""
    ids = row.tolist()
    for i, t in enumerate(ids):
        if t in eos:
            ids = ids[:i] + [t]  # the EOS step was generated (and counted) too
            break
    text_ids = [t for t in ids if t not in eos]
    return bm.tokenizer.decode(text_ids, skip_special_tokens=True), len(ids)


def _generate(model: torch.nn.Module, bm: BenchModel, enc: dict, max_new: int, **kw: object) -> torch.Tensor:
    return model.generate(**enc, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None,
                          top_k=None, pad_token_id=bm.tokenizer.pad_token_id, **kw)


@torch.inference_mode()
def greedy_one(model: torch.nn.Module, bm: BenchModel, req: GenRequest) -> tuple[str, int]:
    """One request alone (no padding): PEFT's reference greedy output."""
    enc = bm.tokenizer(req.prompt, return_tensors="pt").to(bm.device)
    out = _generate(model, bm, dict(enc), req.max_new_tokens)
    return _decode(bm, out[0, enc["input_ids"].shape[1]:], _eos_ids(bm))


def naive_loop(model: PeftModel, bm: BenchModel, requests: Sequence[GenRequest]) -> PeftRun:
    """(a) one request at a time: set_adapter + generate."""
    texts, tokens = [], 0
    t0 = time.perf_counter()
    for req in requests:
        if req.adapter_id is None:
            with model.disable_adapter():
                text, n = greedy_one(model, bm, req)
        else:
            model.set_adapter(req.adapter_id)
            text, n = greedy_one(model, bm, req)
        texts.append(text)
        tokens += n
    return PeftRun("peft_naive", len(requests), tokens, time.perf_counter() - t0, texts)


@torch.inference_mode()
def mixed_batches(model: PeftModel, bm: BenchModel, requests: Sequence[GenRequest], batch: int) -> PeftRun:
    """(b) PEFT mixed-adapter batches of `batch` requests each, left-padded, run to the longest."""
    tok = bm.tokenizer
    tok.padding_side = "left"
    eos = _eos_ids(bm)
    texts, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        enc = tok([r.prompt for r in chunk], return_tensors="pt", padding=True).to(bm.device)
        names = [r.adapter_id or BASE_NAME for r in chunk]
        max_new = max(r.max_new_tokens for r in chunk)
        out = _generate(model, bm, dict(enc), max_new, adapter_names=names)
        for row in out[:, enc["input_ids"].shape[1]:]:
            text, n = _decode(bm, row, eos)
            texts.append(text)
            tokens += n
    return PeftRun("peft_mixed_batch", len(requests), tokens, time.perf_counter() - t0, texts)


def reference_texts(bm: BenchModel, spec: AdapterSpec, requests: Sequence[GenRequest]) -> list[str]:
    """PEFT's greedy texts for requests that all use `spec` (any adapter kind PEFT loads)."""
    with peft_with(bm, [spec]) as model:
        return [greedy_one(model, bm, r)[0] for r in requests]

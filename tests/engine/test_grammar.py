"""GrammarCompiler: bounded in size, time and cache; errors name the field; masks allow only the grammar."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.grammar import GrammarCompiler, GrammarMasks
from server.errors import InvalidRequest

VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _schema(name: str) -> dict:
    return {"type": "object", "properties": {name: {"type": "boolean"}}, "required": [name]}


def test_cache_is_a_bounded_lru(tokenizer):
    compiler = GrammarCompiler(tokenizer, VOCAB, {2}, cache_size=2)
    try:
        for name in ("a", "b", "a", "c", "a", "b"):
            asyncio.run(compiler.get("json_schema", _schema(name), "json_schema"))
        assert compiler.compiles == 4  # a, b, c, then b again (evicted by c; a stayed recent)
    finally:
        compiler.close()


def test_size_and_time_bounds_are_4xx_naming_the_field(tokenizer):
    compiler = GrammarCompiler(tokenizer, VOCAB, {2}, max_source_chars=100, timeout_s=1e-6)
    try:
        with pytest.raises(InvalidRequest, match="regex: at most 100 characters"):
            asyncio.run(compiler.get("regex", "a" * 101, "regex"))
        with pytest.raises(InvalidRequest, match="response_format: too complex"):
            asyncio.run(compiler.get("json_schema", _schema("slow"), "response_format"))
    finally:
        compiler.close()


def test_masks_allow_only_what_the_grammar_allows(tokenizer):
    from server.engine.detokenizer import Detokenizer
    from server.engine.request import Request, SamplingParams
    from server.engine.sequence import Sequence

    compiler = GrammarCompiler(tokenizer, VOCAB, {2})
    try:
        grammar = asyncio.run(compiler.get("choice", ["yes", "no"], "choice"))
    finally:
        compiler.close()
    request = Request([1], SamplingParams(grammar=grammar), None)  # type: ignore[arg-type]
    seqs = [Sequence(request=request, row=0, detok=Detokenizer.__new__(Detokenizer), generator=None,
                     matcher=grammar.matcher()),
            Sequence(request=Request([1], SamplingParams(), None), row=1,  # type: ignore[arg-type]
                     detok=Detokenizer.__new__(Detokenizer), generator=None)]
    logits = torch.zeros(2, VOCAB)
    GrammarMasks(2, VOCAB).apply(logits, seqs)
    allowed = {tokenizer.decode([t]) for t in torch.nonzero(logits[0] > -1e30).flatten().tolist()}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed)
    assert bool((logits[1] == 0).all())  # the unconstrained row is untouched

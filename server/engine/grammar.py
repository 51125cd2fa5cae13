"""Structured output: grammars (JSON schema, any JSON, regex, choice) compiled by xgrammar, masks per row.

Why xgrammar: it is the maintained grammar engine vLLM and SGLang use, runs on
CPU and precomputes most of the token mask per grammar state, so a step's mask
costs microseconds per row. Compilation can take long for a big schema, so it
runs on a small pool of its own (never the engine thread), bounded in time and
source size; results are cached by the hash of (kind, source) in a bounded LRU.

The engine side (`GrammarMasks`) fills one token bitmask row per constrained
sequence and applies them to the step's logits in one call.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import xgrammar as xgr

from server.engine.sequence import Sequence
from server.errors import InvalidRequest

GrammarKind = Literal["json_schema", "json_object", "regex", "choice"]


@dataclass(frozen=True, eq=False)
class Grammar:
    key: str  # sha256 of (kind, source)
    kind: GrammarKind
    compiled: Any  # xgr.CompiledGrammar

    def matcher(self) -> Any:
        return xgr.GrammarMatcher(self.compiled)


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer (built once from the base tokenizer)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Collection[int], *, cache_size: int = 64,
                 timeout_s: float = 10.0, max_source_chars: int = 65536, workers: int = 2) -> None:
        self._tokenizer, self._vocab, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: Any = None  # built on first use (a quarter second for a 50k vocabulary)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraplex-grammar")
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size, self.timeout_s, self.max_source_chars = cache_size, timeout_s, max_source_chars
        self.compiles = 0  # compilations actually run (cache misses)

    async def get(self, kind: GrammarKind, source: Any, field: str) -> Grammar:
        """The compiled grammar (cached); a bad or too-large/too-slow one is a 4xx naming `field`."""
        text = _canonical(kind, source)
        if len(text) > self.max_source_chars:
            raise InvalidRequest(f"{field}: at most {self.max_source_chars} characters, got {len(text)}")
        key = hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        future = asyncio.wrap_future(self._pool.submit(self._compile, kind, source, text))
        try:
            compiled = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise InvalidRequest(f"{field}: too complex (compiling it took over {self.timeout_s:g} s)") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"{field}: {_first_line(exc)}") from None
        grammar = Grammar(key, kind, compiled)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, kind: GrammarKind, source: Any, text: str) -> Any:
        with self._lock:
            self.compiles += 1
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        # Compact JSON (no free whitespace between tokens): a model cannot stall in endless indentation.
        if kind == "json_schema":
            return self._compiler.compile_json_schema(text, strict_mode=True, any_whitespace=False)
        if kind == "json_object":
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return self._compiler.compile_regex(source)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in source)
        return self._compiler.compile_grammar(f"root ::= {alternatives}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _canonical(kind: GrammarKind, source: Any) -> str:
    if kind in ("json_schema", "choice"):
        return json.dumps(source, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "" if source is None else str(source)


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _LOCATION.sub("", lines[0] if lines else type(exc).__name__)[:300]


_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class GrammarMasks:
    """Engine side: a reusable token bitmask, one row per constrained sequence of a step."""

    def __init__(self, rows: int, vocab: int) -> None:
        self.rows, self.vocab = rows, vocab
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(vocab / 32)] int32

    def apply(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> None:
        """Tokens each constrained row's grammar forbids go to -inf (in place on `logits` [rows, vocab])."""
        at = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not at:
            return
        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            self._bitmask = xgr.allocate_token_bitmask(max(self.rows, len(seqs)), self.vocab)
        bitmask = self._bitmask[:len(seqs)]
        for i in at:
            seqs[i].matcher.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab, indices=at)

    @staticmethod
    def advance(seq: Sequence, token: int) -> bool:
        """Feed the sampled token to the row's matcher; True when the grammar is finished (or broken)."""
        matcher = seq.matcher
        if not matcher.accept_token(token):
            return True
        return bool(matcher.is_terminated())

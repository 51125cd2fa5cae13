"""What a sequence's KV row takes from and gives to the prefix cache: at admission, after its prefill, and
around a preemption.

Why its own object: the prefix cache only saves work, so every call here swallows (and logs) the cache's
failures — a failed lookup means computing from position 0, a failed store means no reuse — and the
engine's loop stays about serving.

Thread-safety: engine thread only.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from server.engine.prefix_cache import PrefixCache, namespace
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)


class RowPrefix:
    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache
        # Per adapter key (None = base): prompt tokens looked up at admission, and reused from the cache.
        self.lookup_tokens: Counter[Any] = Counter()
        self.hit_tokens: Counter[Any] = Counter()

    @property
    def enabled(self) -> bool:
        return self.cache.enabled

    def admit(self, seq: Sequence) -> None:
        """Start a new sequence's prefill after its longest cached prefix."""
        try:
            seq.prefilled = seq.cached = self.cache.load(_namespace(seq), seq.request.prompt_ids, seq.row)
        except Exception:  # noqa: BLE001 - the cache only saves work: prefill the whole prompt instead
            log.exception("prefix cache lookup failed; prefilling the whole prompt")
            seq.prefilled = seq.cached = 0
        self.lookup_tokens[seq.request.adapter_key] += seq.prompt_len
        self.hit_tokens[seq.request.adapter_key] += seq.cached

    def prefilled(self, seq: Sequence) -> None:
        """Offer a sequence's freshly prefilled prompt to the cache (before anything frees its row)."""
        self._store(seq, seq.request.prompt_ids)

    def suspend(self, seq: Sequence) -> None:
        """A preemption victim's row is about to be freed: offer what it computed (prompt + output so far),
        so its resume copies most of it back instead of recomputing it."""
        if not self.enabled:
            return
        if seq.prefilling:
            tokens = (seq.request.prompt_ids if seq.resume_ids is None else seq.resume_ids)[:seq.prefilled]
        else:
            tokens = [*seq.request.prompt_ids, *seq.output[:-1]]  # the last one is not fed in yet
        self._store(seq, tokens)

    def resume(self, seq: Sequence) -> None:
        """A preempted sequence got a new row: copy in the longest cached prefix of what it recomputes."""
        if not self.enabled:
            return
        tokens = seq.request.prompt_ids if seq.resume_ids is None else seq.resume_ids
        try:
            seq.prefilled = self.cache.load(_namespace(seq), tokens, seq.row)
        except Exception:  # noqa: BLE001 - the cache only saves work: recompute it all
            log.exception("prefix cache lookup failed; recomputing the whole sequence")
            seq.prefilled = 0

    def _store(self, seq: Sequence, tokens: list[int]) -> None:
        try:
            self.cache.store(_namespace(seq), tokens, seq.row)
        except Exception:  # noqa: BLE001 - the cache only saves work
            log.exception("prefix cache store failed")


def _namespace(s: Sequence) -> tuple[Any, bool]:
    return namespace(s.request.adapter_key, s.lane is not None)

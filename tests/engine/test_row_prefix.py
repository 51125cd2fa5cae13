"""RowPrefix around a preemption: the victim's row (prompt + output so far) goes to the prefix cache before it is
freed, and the resumed sequence copies it back into its new row, leaving only the tail to recompute."""

from __future__ import annotations

import torch

from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from server.engine.request import Request, SamplingParams
from server.engine.row_prefix import RowPrefix
from server.engine.sequence import Sequence


class _Stream:
    def put(self, event) -> None:
        pass


def test_a_preempted_row_is_copied_back_on_resume() -> None:
    cache = KVCache(num_layers=2, max_batch=3, kv_heads=2, max_seq_len=256, head_dim=4,
                    device=torch.device("cpu"), dtype=torch.float32)
    rows = RowPrefix(PrefixCache(cache, capacity_tokens=8 * BLOCK_TOKENS))
    prompt = list(range(100, 150))  # 50 tokens: one whole block
    request = Request(prompt, SamplingParams(max_new_tokens=64), _Stream())  # type: ignore[arg-type]
    seq = Sequence(request, row=0, detok=None, generator=None)
    seq.prefilled, seq.generated, seq.output = len(prompt), 30, list(range(500, 530))
    cache.ensure_initialized([0], 100)
    for t in (*cache.k, *cache.v):
        t[0].normal_()
    rows.suspend(seq)  # the row holds prompt + output[:-1]: 79 tokens, two whole blocks
    seq.suspend()
    seq.row = 2
    rows.resume(seq)
    assert seq.resume_ids == [*prompt, *range(500, 529)] and seq.prefilled == 2 * BLOCK_TOKENS
    for t in (*cache.k, *cache.v):
        assert torch.equal(t[2, :, :2 * BLOCK_TOKENS], t[0, :, :2 * BLOCK_TOKENS])
    assert rows.hit_tokens == {}  # admission's counters, not a resume's

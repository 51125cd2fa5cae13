"""Window and soft-cap arithmetic, and the engine attention outside an engine step (the trainer's forward)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from server.engine.attention import engine_attention, register
from server.engine.attention_math import capped_attention, decode_window_mask, span_mask
from server.model.families import UnsupportedModel
from tests.model import family_factory as ff


def test_windows_follow_transformers_overlay():
    """A query at p sees keys p - window < k <= p (transformers' sliding_window_overlay)."""
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    window, position, n, first = 4, 6, 5, 3
    got = span_mask(position, n, first, window, torch.device("cpu"))
    overlay = sliding_window_overlay(window)
    for j in range(n):
        for c in range(got.shape[1]):
            q, k = position + j, first + c
            assert bool(got[j, c]) == (causal_mask_function(0, 0, q, k) and overlay(0, 0, q, k))
    lengths = torch.tensor([3, 9, 7])  # decode queries at positions 2, 8, 6
    mask = decode_window_mask(lengths, 2, 9, window)[:, 0, 0]
    assert mask.tolist() == [[True] + [False] * 6, [False] * 3 + [True] * 4, [False, True, True, True, True, False,
                                                                                  False]]


def test_capped_attention_equals_gemma2_eager_with_grouped_heads():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8,
                                                                                                      generator=g)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    scores = q @ repeat_kv(k, 2).transpose(-1, -2) * 0.3
    scores = torch.tanh(scores / 2.0) * 2.0
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    expected = scores.softmax(-1) @ repeat_kv(v, 2)
    torch.testing.assert_close(capped_attention(q, k, v, mask, False, 0.3, 2.0), expected)


@pytest.mark.parametrize("model_type", ["gemma2", "mistral"])
def test_no_context_forward_honours_window_and_softcap_with_padding(model_type):
    """The trainer's ordinary forward (no engine step): padded batch longer than the window, same logits as
    transformers' eager attention. Soft-capped layers used to hit SDPA's refusal."""
    ours, reference = ff.build_family(model_type), ff.build_family(model_type)
    reference.config._attn_implementation = "eager"
    ours.config._attn_implementation = register()
    ids = torch.randint(3, ff.VOCAB, (2, 3 * ff.WINDOW), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0  # left padding
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=attention_mask).logits
        expected = reference(input_ids=ids, attention_mask=attention_mask).logits
    keep = attention_mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_an_argument_the_engine_cannot_honour_is_refused_not_dropped():
    """E.g. attention sinks (gpt-oss passes s_aux): a keyword with a value raises, naming the module."""
    model = ff.build_family("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with pytest.raises(UnsupportedModel, match=r"LlamaAttention passes `s_aux="):
        engine_attention(attn, q, kv, kv, None, scaling=0.25, s_aux=torch.zeros(4))
    out, _ = engine_attention(attn, q, kv, kv, None, scaling=0.25, s_aux=None, position_ids=None, use_cache=False)
    assert out.shape == (1, 3, 4, 16)

"""Incremental detokenization, stop strings and partial-stop holdback."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def stream(tok, text: str, stop=(), prompt: str = "Say:") -> tuple[list[str], Detokenizer]:
    d = Detokenizer(tok, tok(prompt)["input_ids"], stop)
    pieces = []
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        d.add(t)
        pieces.append(d.take())
        if d.stopped:
            break
    pieces.append(d.take(final=True))
    return pieces, d


@pytest.mark.parametrize("text", ["Hello world, how are you?", " leading space", "naïve café — 日本語 🙂 ok",
                                  "line\n\nbreaks\tand  double  spaces"])
def test_incremental_text_equals_full_decode(tok, text):
    pieces, _ = stream(tok, text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte chars are held, not emitted broken


def test_stop_string_truncates_and_never_leaks(tok):
    pieces, d = stream(tok, "The answer is 42. END of story, more text", stop=("END",))
    assert d.stopped
    assert "".join(pieces) == "The answer is 42. "
    assert not any("E" in p for p in pieces)


def test_partial_stop_is_held_back_then_released(tok):
    d = Detokenizer(tok, [], ("###",))
    out = []
    for piece in ["a", "#", "#", "b"]:
        for t in tok(piece, add_special_tokens=False)["input_ids"]:
            d.add(t)
        out.append(d.take())
    assert out[1] == "" and out[2] == ""  # "#", "##" might start "###"
    assert "".join(out) + d.take(final=True) == "a##b"
    assert not d.stopped


def test_stop_spanning_tokens_and_earliest_of_several(tok):
    pieces, d = stream(tok, "alpha beta gamma delta", stop=("gamma", "beta g"))
    assert d.stopped and "".join(pieces) == "alpha "


def test_unfinished_stop_prefix_is_flushed_at_the_end(tok):
    pieces, d = stream(tok, "wait for it ST", stop=("STOP",))
    assert not d.stopped and "".join(pieces) == "wait for it ST"


def test_per_token_work_does_not_grow_with_the_output(tok):
    """Only a bounded window of text and ids is decoded/kept per step, however long the output."""
    text = "the quick brown fox jumps over the lazy dog. " * 60
    d = Detokenizer(tok, [], ("never-seen",))
    out, widest = [], 0
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        d.add(t)
        out.append(d.take())
        widest = max(widest, len(d.buf), len(d.ids) - d.prefix_offset)
    assert "".join(out) + d.take(final=True) == text
    assert widest <= 2 * len("never-seen") + 8

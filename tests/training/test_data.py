"""Examples → tokens: prompt masking, chat rendering, limits, deterministic batch order, spec checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.errors import InvalidRequest
from server.training.data import IGNORE_INDEX, BatchOrder, collate, tokenize_example
from server.training.spec import Example, TrainingJobSpec, check_spec, parse_jsonl


@pytest.fixture(scope="module")
def tok(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_prompt_tokens_masked_completion_ends_with_eos(tok):
    ex = tokenize_example(Example(prompt="Hello", completion=" there"), tok, 64)
    prompt = tok("Hello")["input_ids"]
    assert ex.input_ids[:len(prompt)] == prompt
    assert ex.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex.labels[len(prompt):] == tok(" there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_chat_messages_use_template_and_train_only_the_answer(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]
    ex = tokenize_example(Example(messages=msgs), tok, 128)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(t == IGNORE_INDEX for t in ex.labels[:n])
    assert tok.decode(ex.input_ids[n:]).startswith("Ahoy<|im_end|>")
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]).startswith("Ahoy")


def test_too_long_example_names_its_index(tok):
    with pytest.raises(InvalidRequest, match=r"data\[0\].*limit per example is 8"):
        tokenize_example(Example(prompt="word " * 20, completion="x"), tok, 8)


def test_example_forms_are_checked():
    for bad in ({"prompt": "p"}, {"prompt": "p", "completion": ""},
                {"messages": [{"role": "user", "content": "hi"}]},
                {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
                {"prompt": "p", "completion": "c", "messages": []}, {"prompt": "p", "completion": "c", "x": 1}):
        with pytest.raises(ValidationError):
            Example.model_validate(bad)


def test_batch_order_is_deterministic_and_covers_each_epoch():
    order = BatchOrder(5, 2, seed=3)
    seq = [i for k in range(5) for i in order.indices(k)]  # 10 = two epochs
    assert sorted(seq[:5]) == list(range(5)) and sorted(seq[5:]) == list(range(5))
    assert seq == [i for k in range(5) for i in BatchOrder(5, 2, seed=3).indices(k)]
    assert seq != [i for k in range(5) for i in BatchOrder(5, 2, seed=4).indices(k)]


def test_collate_right_pads(tok):
    a = tokenize_example(Example(prompt="a b c d", completion=" e"), tok, 64)
    b = tokenize_example(Example(prompt="a", completion=" b"), tok, 64)
    batch = collate([a, b], 0, "cpu")
    assert batch.attention_mask[1].tolist() == [1] * len(b.input_ids) + [0] * (len(a.input_ids) - len(b.input_ids))
    assert batch.labels[1, len(b.input_ids):].eq(IGNORE_INDEX).all()
    assert batch.num_targets == a.num_targets + b.num_targets


def test_spec_checks(train_settings):
    ok = dict(adapter_id="x", data=[{"prompt": "p", "completion": "c"}])
    check_spec(TrainingJobSpec(**ok), train_settings)
    for bad in ({"rank": 0}, {"learning_rate": 0}, {"learning_rate": 5.0}, {"batch_size": 0}, {"steps": 0},
                {"method": "ia3"}, {"warmup_steps": 500}, {"method": "miss", "variant": "mini"},
                {"variant": "bat"}, {"target_modules": []}, {"target_modules": ["q_proj", "q_proj"]},
                {"unknown": 1}):
        with pytest.raises(ValidationError):
            TrainingJobSpec(**{**ok, **bad})
    for bad, msg in (({"rank": 33}, "rank 33 exceeds"), ({"data": []}, "data is empty"),
                     ({"adapter_id": "../x"}, "invalid adapter id"),
                     ({"steps": train_settings.max_train_steps + 1}, "steps")):
        with pytest.raises(InvalidRequest, match=msg):
            check_spec(TrainingJobSpec(**{**ok, **bad}), train_settings)


def test_idempotency_hash_ignores_key_order():
    a = TrainingJobSpec.model_validate_json('{"adapter_id": "x", "rank": 4, "data": [{"prompt": "p", "completion": "c"}]}')
    b = TrainingJobSpec.model_validate_json('{"data": [{"completion": "c", "prompt": "p"}], "rank": 4, "adapter_id": "x"}')
    assert a.body_hash() == b.body_hash()
    assert a.body_hash() != TrainingJobSpec(**{**a.model_dump(), "rank": 5}).body_hash()


def test_jsonl_parsing():
    assert parse_jsonl('{"a": 1}\n\n{"b": 2}\n', 10, 8) == [{"a": 1}, {"b": 2}]
    with pytest.raises(InvalidRequest, match="line 2"):
        parse_jsonl('{"a": 1}\nnot json', 10, 8)
    with pytest.raises(InvalidRequest, match="too many"):
        parse_jsonl('{}\n{}\n{}', 2, 8)


def test_jsonl_nesting_is_bounded():
    """Past CPython's json recursion limit, and under it but past max_depth: a 422 naming the line."""
    for line in ("[" * 100_000 + "]" * 100_000, '{"a": ' + "[" * 9 + "]" * 9 + "}"):
        with pytest.raises(InvalidRequest, match="data line 2 is not valid JSON: nested deeper than 8 levels"):
            parse_jsonl('{"a": 1}\n' + line, 10, 8)
    assert parse_jsonl('{"a": ' + "[" * 7 + "]" * 7 + "}", 10, 8)  # depth 8: accepted

"""The SDK against a real server: generation (plain, streamed, async), errors, adapters, training."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import (
    AsyncClient,
    AuthError,
    Client,
    InvalidInputError,
    NotFoundError,
    TrainingJob,
    ValidationError,
)
from tests.client.server_fixtures import KEY, OTHER_KEY, TRAIN_DATA, peft_dir, server_url, train_file  # noqa: F401

PROMPT = "The capital of France is"


@pytest.fixture
def client(server_url: str) -> Client:
    with Client(server_url, KEY, timeout=120) as c:
        yield c


def test_health_ready_models(client: Client) -> None:
    assert client.ready() is True
    assert isinstance(client.health(), dict)
    ids = [m.id for m in client.models()]
    assert ids, "the base model is always listed"


def test_generate_plain_is_greedy_and_typed(client: Client) -> None:
    first = client.generate(PROMPT, max_new_tokens=8, temperature=0)
    again = client.generate(PROMPT, max_new_tokens=8, temperature=0)
    assert first.text == again.text and first.text
    assert first.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 0 and 0 < first.usage.completion_tokens <= 8


def test_stream_deltas_join_to_the_plain_text(client: Client) -> None:
    plain = client.generate(PROMPT, max_new_tokens=10, temperature=0)
    with client.generate_stream(PROMPT, max_new_tokens=10, temperature=0) as stream:
        deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == plain.text == stream.text
    assert stream.finish_reason == plain.finish_reason
    assert stream.usage == plain.usage
    assert stream.result().text == plain.text


async def test_async_client_generate_and_stream(server_url: str, client: Client) -> None:
    plain = client.generate(PROMPT, max_new_tokens=6, temperature=0)
    async with AsyncClient(server_url, KEY, timeout=120) as ac:
        result = await ac.generate(PROMPT, max_new_tokens=6, temperature=0)
        stream = await ac.generate_stream(PROMPT, max_new_tokens=6, temperature=0)
        deltas = [d async for d in stream]
        adapters = await ac.list_adapters()
    assert result.text == plain.text == "".join(deltas)
    assert stream.finish_reason == plain.finish_reason
    assert isinstance(adapters, list)


def test_errors_carry_the_server_message(server_url: str, client: Client) -> None:
    with pytest.raises(NotFoundError) as info:
        client.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=4)
    assert info.value.status == 404 and "no-such-adapter" in info.value.message
    with pytest.raises(ValidationError) as info:
        client.generate("", max_new_tokens=4)
    assert info.value.status == 422 and "prompt" in info.value.message.lower()
    with pytest.raises(ValidationError):
        client.get_adapter("..")
    with pytest.raises(NotFoundError):  # the stream's opening status is checked too
        client.generate_stream(PROMPT, adapter_id="no-such-adapter")
    with Client(server_url, "wrong-key-123456") as bad, pytest.raises(AuthError) as info:
        bad.list_adapters()
    assert info.value.status == 401 and info.value.message


def test_upload_list_get_generate_delete(client: Client, server_url: str, peft_dir: Path) -> None:
    record = client.upload_adapter("sdk-lora", peft_dir)
    assert (record.id, record.tenant, record.type, record.rank) == ("sdk-lora", "alice", "lora", 8)
    assert set(record.target_modules) == {"q_proj", "v_proj"} and record.size_bytes and record.sha256
    assert record.mode == "unmerged" and record.version == 1
    assert client.upload_adapter("sdk-lora", peft_dir).version == 2
    assert "sdk-lora" in [a.id for a in client.list_adapters()]
    assert client.get_adapter("sdk-lora").version == 2
    base = client.generate(PROMPT, max_new_tokens=8, temperature=0)
    tuned = client.generate(PROMPT, adapter_id="sdk-lora", max_new_tokens=8, temperature=0)
    assert tuned.adapter_id == "sdk-lora" and tuned.text != base.text
    with Client(server_url, OTHER_KEY) as bob, pytest.raises(NotFoundError):
        bob.get_adapter("sdk-lora")  # another tenant's adapter does not exist for bob
    client.delete_adapter("sdk-lora")
    with pytest.raises(NotFoundError):
        client.get_adapter("sdk-lora")


def test_generate_with_a_weighted_mix(client: Client, peft_dir: Path) -> None:
    """`adapters` as {id: weight}: a one-member mix at weight 1 is the adapter itself; at 0 it is the base."""
    client.upload_adapter("sdk-mix", peft_dir)
    alone = client.generate(PROMPT, adapter_id="sdk-mix", max_new_tokens=8, temperature=0)
    mixed = client.generate(PROMPT, adapters={"sdk-mix": 1.0}, max_new_tokens=8, temperature=0)
    muted = client.generate(PROMPT, adapters=[{"id": "sdk-mix", "weight": 0.0}], max_new_tokens=8, temperature=0)
    assert mixed.text == alone.text
    assert muted.text == client.generate(PROMPT, max_new_tokens=8, temperature=0).text
    with pytest.raises(NotFoundError):
        client.generate(PROMPT, adapters={"sdk-mix": 0.5, "nobody": 0.5}, max_new_tokens=2)
    client.delete_adapter("sdk-mix")


def test_upload_refuses_a_directory_without_safetensors(client: Client, tmp_path: Path, peft_dir: Path) -> None:
    (tmp_path / "adapter_config.json").write_bytes((peft_dir / "adapter_config.json").read_bytes())
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidInputError, match="pickled weights"):
        client.upload_adapter("x", tmp_path)


def test_merge_and_unmerge(client: Client, peft_dir: Path) -> None:
    client.upload_adapter("sdk-merge", peft_dir)
    before = client.generate(PROMPT, adapter_id="sdk-merge", max_new_tokens=8, temperature=0).text
    assert client.merge_adapter("sdk-merge").mode == "merged"
    assert client.generate(PROMPT, adapter_id="sdk-merge", max_new_tokens=8, temperature=0).text == before
    assert client.unmerge_adapter("sdk-merge").mode == "unmerged"
    client.delete_adapter("sdk-merge")


def test_train_wait_with_progress_then_serve(client: Client) -> None:
    seen: list[TrainingJob] = []
    job = client.submit_training("sdk-trained", TRAIN_DATA, rank=4, steps=4, learning_rate=1e-2,
                                 batch_size=2, idempotency_key="sdk-train-1")
    assert job.status in ("queued", "running") and job.steps == 4
    same = client.submit_training("sdk-trained", TRAIN_DATA, rank=4, steps=4, learning_rate=1e-2,
                                  batch_size=2, idempotency_key="sdk-train-1")
    assert same.id == job.id
    done = client.wait(job.id, on_progress=seen.append, poll_interval=0.1, timeout=120)
    assert done.status == "succeeded", done.error
    assert done.step == 4 and done.loss_history and seen[-1].status == "succeeded"
    assert job.id in [j.id for j in client.list_jobs()]
    assert client.get_adapter("sdk-trained").type == "lora"
    assert client.generate("Say hi:", adapter_id="sdk-trained", max_new_tokens=4, temperature=0).text


def test_train_from_jsonl_file_and_cancel(client: Client, train_file: Path) -> None:
    job = client.submit_training("sdk-cancelled", train_file, rank=4, steps=5000, batch_size=1)
    cancelled = client.cancel_job(job.id)
    assert cancelled.id == job.id
    final = client.wait(job.id, poll_interval=0.1, timeout=60)
    assert final.status == "cancelled"


def test_decoding_options_are_typed(client: Client) -> None:
    plain = client.generate(PROMPT, max_new_tokens=4, temperature=0, logprobs=2)
    assert len(plain.logprobs) == plain.usage.completion_tokens and len(plain.logprobs[0].top_logprobs) == 2
    assert "".join(lp.token for lp in plain.logprobs) == plain.text
    many = client.generate(PROMPT, max_new_tokens=4, temperature=2.0, seed=9, n=3,
                           logit_bias={plain.logprobs[0].token_id: -100})
    assert [c.index for c in many.choices] == [0, 1, 2] and many.text == many.choices[0].text
    assert all(plain.logprobs[0].token_id != lp.token_id for c in many.choices for lp in c.logprobs[:1])
    assert many.usage.completion_tokens == sum(c.completion_tokens for c in many.choices)
    picked = client.generate(PROMPT, max_new_tokens=8, choice=["yes", "no"])
    assert picked.text in ("yes", "no")
    with client.generate_stream(PROMPT, max_new_tokens=4, temperature=2.0, seed=9, n=3, logprobs=0,
                                logit_bias={plain.logprobs[0].token_id: -100}) as stream:
        deltas = list(stream)
    result = stream.result()  # the same seeds draw the same choices; logprobs change nothing drawn
    assert "".join(deltas) == result.text and [c.text for c in result.choices] == [c.text for c in many.choices]
    assert len(result.logprobs) == many.choices[0].completion_tokens
    with pytest.raises(ValidationError, match="nonsense"):
        client.generate(PROMPT, json_schema={"type": "nonsense"})

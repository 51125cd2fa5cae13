"""Pieces with no server in them: the SSE decoder, job polling, and the CLI's tables and progress bar."""

from __future__ import annotations

import io

import httpx
import pytest

from client import AsyncClient, Client, ConnectionFailedError, NotFoundError, TrainingJob
from client.cli_output import ProgressBar, format_duration, format_table, human_bytes
from client.streaming import StreamDecoder


def feed(decoder: StreamDecoder, body: str) -> list[str]:
    out: list[str] = []
    for line in body.split("\n"):
        out += decoder.feed(line)
    return out + decoder.close()


def test_decoder_yields_deltas_and_keeps_the_final_event() -> None:
    d = StreamDecoder()
    body = ('data: {"text": "Hel"}\n\n: keep-alive\n\ndata: {"text": "lo"}\n\n'
            'data: {"id": "r1", "adapter_id": null, "finish_reason": "length",'
            ' "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    assert feed(d, body) == ["Hel", "lo"]
    result = d.result()
    assert (result.text, result.finish_reason, result.id) == ("Hello", "length", "r1")
    assert result.usage.completion_tokens == 2 and d.done
    d.check_complete()


def test_decoder_joins_multiline_data_and_handles_crlf() -> None:
    d = StreamDecoder()
    assert feed(d, 'data: {"text":\r\ndata:  "a b"}\r\n\r\ndata: [DONE]\n') == ["a b"]


def test_decoder_error_event_raises_the_typed_error() -> None:
    d = StreamDecoder()
    with pytest.raises(NotFoundError, match="gone"):
        feed(d, 'data: {"text": "x"}\n\ndata: {"error": {"type": "not_found", "message": "gone", "status": 404}}\n\n')


def test_a_stream_cut_before_the_end_is_an_error() -> None:
    d = StreamDecoder()
    feed(d, 'data: {"text": "partial"}\n\n')
    with pytest.raises(ConnectionFailedError, match="ended before"):
        d.check_complete()


def jobs_server(states: list[dict]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=states.pop(0) if len(states) > 1 else states[0])

    return httpx.MockTransport(handler)


STATES = [
    {"id": "j", "status": "queued", "adapter_id": "a", "progress": {"step": 0, "steps": 4}},
    {"id": "j", "status": "running", "adapter_id": "a", "progress": {"step": 2, "steps": 4}, "loss": 1.5},
    {"id": "j", "status": "running", "adapter_id": "a", "progress": {"step": 2, "steps": 4}, "loss": 1.5},
    {"id": "j", "status": "succeeded", "adapter_id": "a", "progress": {"step": 4, "steps": 4},
     "loss_history": [{"step": 1, "loss": 2.0}, {"step": 4, "loss": 0.5}]},
]


def test_wait_reports_each_change_once(monkeypatch) -> None:
    monkeypatch.setattr("client.transport.time.sleep", lambda s: None)
    seen: list[TrainingJob] = []
    with Client("http://t", transport=jobs_server(list(STATES))) as c:
        final = c.wait("j", on_progress=seen.append, poll_interval=0.01)
    assert [(j.status, j.step) for j in seen] == [("queued", 0), ("running", 2), ("succeeded", 4)]
    assert final.done and final.loss == 0.5 and final.loss_history == [2.0, 0.5]


async def test_async_wait_accepts_an_async_callback(monkeypatch) -> None:
    async def no_sleep(seconds: float) -> None:
        return None

    monkeypatch.setattr("client.transport.asyncio.sleep", no_sleep)
    seen: list[str] = []

    async def on_progress(job: TrainingJob) -> None:
        seen.append(job.status)

    async with AsyncClient("http://t", transport=jobs_server(list(STATES))) as c:
        final = await c.wait("j", on_progress=on_progress, poll_interval=0.01)
    assert final.status == "succeeded" and seen == ["queued", "running", "succeeded"]


def test_sync_wait_refuses_an_async_callback(monkeypatch) -> None:
    async def on_progress(job: TrainingJob) -> None:
        return None

    with Client("http://t", transport=jobs_server(list(STATES))) as c, pytest.raises(TypeError, match="AsyncClient"):
        c.wait("j", on_progress=on_progress)


def test_progress_bar_shows_step_loss_and_eta() -> None:
    now = [100.0]
    out = io.StringIO()
    bar = ProgressBar(stream=out, width=10, clock=lambda: now[0])
    job = TrainingJob.from_dict
    bar.update(job({"id": "j", "status": "running", "progress": {"step": 10, "steps": 110}, "loss": 2.0}))
    now[0] = 110.0
    bar.update(job({"id": "j", "status": "running", "progress": {"step": 20, "steps": 110}, "loss": 1.25}))
    bar.update(job({"id": "j", "status": "succeeded", "progress": {"step": 110, "steps": 110}, "loss": 0.5}))
    lines = out.getvalue().splitlines()
    assert "step 10/110" in lines[0] and "ETA --:--" in lines[0]
    assert "step 20/110" in lines[1] and "loss 1.2500" in lines[1] and "ETA 01:30" in lines[1]
    assert lines[2].startswith("[##########]") and "done" in lines[2]


def test_table_and_formatting_helpers() -> None:
    table = format_table(["ID", "RANK"], [["a", 8], ["longer-id", None]]).splitlines()
    assert table == ["ID         RANK", "a          8", "longer-id  -"]
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "--:--"

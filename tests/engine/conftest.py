"""Engine-level fixtures: a context-sensitive tiny model and engines driven without HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from server.engine.engine import Engine
from server.engine.request import ErrorEvent, FinishEvent, Request, RequestStream, SamplingParams, TokenEvent
from server.model.load import BaseModel, load_base
from server.settings import Settings
from tests.harness import cpu_settings


@pytest.fixture(scope="session")
def varied_base(varied_model_dir) -> BaseModel:
    return load_base(cpu_settings(varied_model_dir))


@pytest.fixture
def make_engine(varied_base) -> Iterator:
    engines: list[Engine] = []

    def make(base: BaseModel | None = None, placement=None, background=None, **settings) -> Engine:
        base = base or varied_base
        s = Settings(model="unused", device=base.device.type, dtype="float32", **settings)
        engine = Engine(base, s, placement=placement, background=background)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str
    events: int  # TokenEvents received


async def run(engine: Engine, prompt_ids: list[int], delay: float = 0.0, **params) -> Result:
    """Submit one request to `engine` (after `delay` s) and collect everything it emits."""
    if delay:
        await asyncio.sleep(delay)
    request = Request(list(prompt_ids), SamplingParams(**params), RequestStream())
    engine.submit(request)
    text, tokens, events = "", [], 0
    while True:
        event = await asyncio.wait_for(request.stream.get(), 60)
        if isinstance(event, TokenEvent):
            text += event.text
            tokens.extend(event.token_ids)
            events += 1
        elif isinstance(event, FinishEvent):
            assert event.completion_tokens == len(tokens)
            return Result(text, tokens, event.finish_reason, events)
        elif isinstance(event, ErrorEvent):
            raise event.error

"""One request through an in-process Engine, its stream drained: what the engine-level benches and tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from server.engine.engine import Engine
from server.engine.request import ErrorEvent, FinishEvent, Request, RequestStream, SamplingParams, TokenEvent


async def generate(engine: Engine, prompt_ids: list[int], params: SamplingParams,
                   adapter_key: Hashable | None = None, timeout_s: float = 600.0) -> list[list[int]]:
    """Submit one request; the token ids of each of its `n` choices, once all have finished. A request
    that fails raises its error; a stream silent for `timeout_s` raises TimeoutError."""
    request = Request(list(prompt_ids), params, RequestStream(), adapter_key=adapter_key)
    engine.submit(request)
    tokens: list[list[int]] = [[] for _ in range(params.n)]
    left = params.n
    while left:
        event = await asyncio.wait_for(request.stream.get(), timeout_s)
        if isinstance(event, TokenEvent):
            tokens[event.index].extend(event.token_ids)
        elif isinstance(event, FinishEvent):
            left -= 1
        elif isinstance(event, ErrorEvent):
            raise event.error
    return tokens

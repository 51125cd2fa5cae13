"""Route: POST /generate (plain JSON or SSE). Work happens in the engine."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api import decoding as dec, generation as gen
from server.api.deps import Principal, get_principal
from server.api.responses import SSE
from server.api.schemas import GenerateRequest, GenerateResponse, normalize_stop
from server.engine.request import FinishEvent, Request as EngineRequest, SamplingParams, TokenEvent
from server.errors import ApiError
from server.api.services import Services, get_services

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": SSE}})
async def generate(body: GenerateRequest, request: Request,
                   principal: Principal = Depends(get_principal)):
    services = get_services(request)
    kind, source, field = _constraint(body)
    grammar = await dec.compile_grammar(services, kind, source, field)
    params = SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=body.seed, stop=normalize_stop(body.stop),
                            **dec.decoding_options(body, body.logprobs, grammar))
    prompt_ids = await gen.encode_prompt(services, body.prompt)
    gen.check_request(services, prompt_ids, params)
    key = await gen.resolve_adapter(services, principal, body.adapter_id, body.adapters)
    job = gen.submit(services, principal, prompt_ids, params, key, "generate")
    text = dec.TokenText(services.base.tokenizer)
    if body.stream:
        return StreamingResponse(_sse(services, job, request, body.adapter_id, text), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    done = await dec.collect(services, job, request)
    first = done.choices[0]
    out: dict[str, Any] = {"id": job.request_id, "adapter_id": body.adapter_id, "text": first.text,
                           "finish_reason": first.finish_reason,
                           "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                                     "cached_tokens": done.cached_tokens}}
    if body.logprobs is not None:
        out["logprobs"] = dec.native_logprobs(first.logprobs, text)
    if body.n > 1:
        out["choices"] = [_choice(c, body.logprobs is not None, text) for c in done.choices]
    return out


def _constraint(body: GenerateRequest) -> tuple[Any, Any, str]:
    if body.json_schema is not None:
        return "json_schema", body.json_schema, "json_schema"
    if body.regex is not None:
        return "regex", body.regex, "regex"
    if body.choice is not None:
        return "choice", body.choice, "choice"
    return None, None, ""


def _choice(c: dec.Choice, logprobs: bool, text: dec.TokenText) -> dict[str, Any]:
    out: dict[str, Any] = {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                           "completion_tokens": c.completion_tokens}
    if logprobs:
        out["logprobs"] = dec.native_logprobs(c.logprobs, text)
    return out


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(services: Services, job: EngineRequest, request: Request, adapter_id: str | None,
               text: dec.TokenText) -> AsyncIterator[str]:
    n, completion, cached = job.params.n, 0, 0
    try:
        async with contextlib.aclosing(gen.events(services, job, request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    if event.text or event.logprobs:
                        yield sse(_delta(event, n, text))
                elif isinstance(event, FinishEvent):
                    completion += event.completion_tokens
                    cached = max(cached, event.cached_tokens)
                    final: dict[str, Any] = {"id": job.request_id, "adapter_id": adapter_id,
                                             "finish_reason": event.finish_reason,
                                             "usage": {"prompt_tokens": event.prompt_tokens,
                                                       "completion_tokens": completion, "cached_tokens": cached}}
                    if n > 1:
                        final["index"] = event.index
                    yield sse(final)
    except ApiError as exc:
        yield sse({"error": {"type": exc.type, "message": exc.message}})
    yield "data: [DONE]\n\n"


def _delta(event: TokenEvent, n: int, text: dec.TokenText) -> dict[str, Any]:
    out: dict[str, Any] = {"text": event.text}
    if n > 1:
        out["index"] = event.index
    if event.logprobs:
        out["logprobs"] = dec.native_logprobs(list(event.logprobs), text)
    return out

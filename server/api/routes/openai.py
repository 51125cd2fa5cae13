"""Routes: OpenAI-compatible /v1/models, /v1/completions, /v1/chat/completions.

Shapes follow OpenAI's so the official `openai` client works unchanged;
`model` is the base model id or one of the caller's adapter ids. Errors use
400 and OpenAI's error body (server/api/errors.py).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api import generation as gen
from server.api.deps import Principal, get_principal
from server.api.responses import SSE, ModelList, ok
from server.api.routes.generate import SSE_HEADERS, sse
from server.api.schemas import ChatRequest, CompletionRequest, OpenAIFields, normalize_stop
from server.engine.request import FinishEvent, Request as EngineRequest, SamplingParams, TokenEvent
from server.errors import ApiError
from server.services import Services, get_services

router = APIRouter()

# OpenAI knows no "cancelled"; a cancelled request has no reader anyway.
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}

ChunkBuilder = Callable[[str | None, str | None], dict[str, Any]]  # (delta text, finish) -> chunk


@router.get("/v1/models", responses=ok(ModelList, 200))
async def list_models(request: Request, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    services = get_services(request)
    created = int(time.time())
    ids = [services.base.model_id]
    lister = getattr(services.store, "adapter_ids", None)
    if lister is not None:
        ids += [a for a in lister(principal.tenant) if a != services.base.model_id]
    owners = ["loraplex"] + [principal.tenant] * (len(ids) - 1)
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": o} for i, o in zip(ids, owners)]}


def _params(body: OpenAIFields, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, seed=body.seed, stop=normalize_stop(body.stop))


def _usage(finish: FinishEvent) -> dict[str, int]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


async def _start(services: Services, principal: Principal, body: OpenAIFields, prompt_ids: list[int],
                 max_tokens: int | None, route: str) -> EngineRequest:
    if max_tokens is None:  # OpenAI's "as much as fits"
        room = services.base.max_context - len(prompt_ids)
        max_tokens = max(1, min(services.settings.max_new_tokens_limit, room))
    params = _params(body, max_tokens)
    gen.check_request(services, prompt_ids, params, length_field="max_tokens")
    key = await gen.resolve_adapter(services, principal, body.model)
    return gen.submit(services, prompt_ids, params, key, route)


@router.post("/v1/completions", responses={200: {"content": SSE}})
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(get_principal)):
    services = get_services(request)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prompt_ids = await gen.encode_prompt(services, prompt)
    job = await _start(services, principal, body, prompt_ids, body.max_tokens, "completions")
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt if body.echo else ""

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        return _stream(services, job, request, chunk, body, prefix=echo)
    done = await gen.complete(services, job, request)
    out = chunk(echo + done.text, FINISH[done.finish_reason])
    out["usage"] = _usage(FinishEvent(done.finish_reason, done.prompt_tokens, done.completion_tokens))  # type: ignore[arg-type]
    return out


@router.post("/v1/chat/completions", responses={200: {"content": SSE}})
async def chat_completions(body: ChatRequest, request: Request, principal: Principal = Depends(get_principal)):
    services = get_services(request)
    prompt_ids = await gen.encode_chat(services, body.template_messages())
    max_tokens = body.max_completion_tokens or body.max_tokens
    job = await _start(services, principal, body, prompt_ids, max_tokens, "chat")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
        first = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]}
        return _stream(services, job, request, chunk, body, first=first)
    done = await gen.complete(services, job, request)
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "logprobs": None, "finish_reason": FINISH[done.finish_reason]}],
            "usage": _usage(FinishEvent(done.finish_reason, done.prompt_tokens, done.completion_tokens))}  # type: ignore[arg-type]


def _stream(services: Services, job: EngineRequest, request: Request, chunk: ChunkBuilder, body: OpenAIFields,
            first: dict[str, Any] | None = None, prefix: str = "") -> StreamingResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_chunks(services, job, request, chunk, include_usage, first, prefix),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _chunks(services: Services, job: EngineRequest, request: Request, chunk: ChunkBuilder,
                  include_usage: bool, first: dict[str, Any] | None, prefix: str) -> AsyncIterator[str]:
    if first is not None:
        yield sse(first)
    if prefix:
        yield sse(chunk(prefix, None))
    try:
        async with contextlib.aclosing(gen.events(services, job, request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield sse(chunk(event.text, None))
                elif isinstance(event, FinishEvent):
                    yield sse(chunk(None, FINISH[event.finish_reason]))
                    if include_usage:
                        final = chunk(None, None)
                        final["choices"] = []
                        final["usage"] = _usage(event)
                        yield sse(final)
    except ApiError as exc:
        yield sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.type}})
    yield "data: [DONE]\n\n"

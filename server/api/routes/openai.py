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

from server.api import decoding as dec, generation as gen
from server.api.deps import Principal, get_principal
from server.api.responses import SSE, ModelList, ok
from server.api.routes.generate import SSE_HEADERS, sse
from server.api.schemas import ChatRequest, CompletionRequest, OpenAIFields, normalize_stop
from server.engine.request import FinishEvent, Request as EngineRequest, SamplingParams, TokenEvent, TokenLogprob
from server.errors import ApiError, InvalidRequest
from server.api.services import Services, get_services

router = APIRouter()

# OpenAI knows no "cancelled"; a cancelled request has no reader anyway.
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}

# (choice index, delta text, finish, logprobs of the delta's tokens) -> chunk
ChunkBuilder = Callable[[int, str | None, str | None, list[TokenLogprob]], dict[str, Any]]


@router.get("/v1/models", responses=ok(ModelList, 200))
async def list_models(request: Request, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    services = get_services(request)
    created = int(time.time())
    ids = [services.base.model_id]
    ids += [a for a in services.store.adapter_ids(principal.tenant) if a != services.base.model_id]
    owners = ["loraplex"] + [principal.tenant] * (len(ids) - 1)
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": o} for i, o in zip(ids, owners)]}


async def _start(services: Services, principal: Principal, body: OpenAIFields, prompt_ids: list[int],
                 max_tokens: int | None, route: str, logprobs: int | None) -> EngineRequest:
    if max_tokens is None:  # OpenAI's "as much as fits"
        room = services.base.max_context - len(prompt_ids)
        max_tokens = max(1, min(services.settings.max_new_tokens_limit, room))
    kind, source = dec.response_format_grammar(body.response_format)
    grammar = await dec.compile_grammar(services, kind, source, "response_format")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=body.seed, stop=normalize_stop(body.stop),
                            **dec.decoding_options(body, logprobs, grammar))
    gen.check_request(services, prompt_ids, params, length_field="max_tokens")
    if body.adapters is not None and body.model != services.base.model_id:
        raise InvalidRequest(f"adapters: with a mix, model must be the base model's id "
                             f"{services.base.model_id!r}, not {body.model!r}")
    key = await gen.resolve_adapter(services, principal, None if body.adapters else body.model, body.adapters)
    return gen.submit(services, principal, prompt_ids, params, key, route)


@router.post("/v1/completions", responses={200: {"content": SSE}})
async def completions(body: CompletionRequest, request: Request, principal: Principal = Depends(get_principal)):
    services = get_services(request)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prompt_ids = await gen.encode_prompt(services, prompt)
    job = await _start(services, principal, body, prompt_ids, body.max_tokens, "completions", body.logprobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt if body.echo else ""
    text = dec.TokenText(services.base.tokenizer)
    offsets = [len(echo)] * body.n  # text_offset of each choice's next token

    def chunk(index: int, delta: str | None, finish: str | None, lps: list[TokenLogprob]) -> dict[str, Any]:
        logprobs = None
        if body.logprobs is not None and (lps or finish is None):
            logprobs = dec.completion_logprobs(lps, text, offsets[index])
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}]}

    if body.stream:
        return _stream(services, job, request, chunk, body, prefix=echo)
    done = await dec.collect(services, job, request)
    out = chunk(0, None, None, [])
    out["choices"] = [chunk(c.index, echo + c.text, FINISH[c.finish_reason], c.logprobs)["choices"][0]
                      for c in done.choices]
    out["usage"] = dec.usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)
    return out


@router.post("/v1/chat/completions", responses={200: {"content": SSE}})
async def chat_completions(body: ChatRequest, request: Request, principal: Principal = Depends(get_principal)):
    services = get_services(request)
    prompt_ids = await gen.encode_chat(services, body.template_messages())
    max_tokens = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = await _start(services, principal, body, prompt_ids, max_tokens, "chat", logprobs)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    text = dec.TokenText(services.base.tokenizer)

    def chunk(index: int, delta: str | None, finish: str | None, lps: list[TokenLogprob]) -> dict[str, Any]:
        content: dict[str, Any] = {} if delta is None else {"content": delta}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": index, "delta": content, "finish_reason": finish,
                             "logprobs": dec.chat_logprobs(lps, text) if logprobs is not None and lps else None}]}

    if body.stream:
        first = [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                  "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]} for i in range(body.n)]
        return _stream(services, job, request, chunk, body, first=first)
    done = await dec.collect(services, job, request)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": dec.chat_logprobs(c.logprobs, text) if logprobs is not None else None,
                "finish_reason": FINISH[c.finish_reason]} for c in done.choices]
    return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices,
            "usage": dec.usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)}


def _stream(services: Services, job: EngineRequest, request: Request, chunk: ChunkBuilder, body: OpenAIFields,
            first: list[dict[str, Any]] | None = None, prefix: str = "") -> StreamingResponse:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_chunks(services, job, request, chunk, include_usage, first or [], prefix),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _chunks(services: Services, job: EngineRequest, request: Request, chunk: ChunkBuilder,
                  include_usage: bool, first: list[dict[str, Any]], prefix: str) -> AsyncIterator[str]:
    for opening in first:
        yield sse(opening)
    if prefix:
        for i in range(job.params.n):
            yield sse(chunk(i, prefix, None, []))
    completion = finished = cached = 0
    try:
        async with contextlib.aclosing(gen.events(services, job, request)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    if event.text or event.logprobs:
                        yield sse(chunk(event.index, event.text, None, list(event.logprobs)))
                elif isinstance(event, FinishEvent):
                    completion += event.completion_tokens
                    cached = max(cached, event.cached_tokens)  # n > 1: the first sequence reused the cache
                    finished += 1
                    yield sse(chunk(event.index, None, FINISH[event.finish_reason], []))
                    if include_usage and finished == job.params.n:  # the prompt once, completions summed
                        final = chunk(0, None, None, [])
                        final["choices"] = []
                        final["usage"] = dec.usage(event.prompt_tokens, completion, cached)
                        yield sse(final)
    except ApiError as exc:
        yield sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.type}})
    yield "data: [DONE]\n\n"

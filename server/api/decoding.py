"""What the generation routes share beyond the prompt: decoding options in, n choices and logprobs out.

Why here and not in each route: /generate and both OpenAI routes accept the
same penalties, biases, n and constraints under (mostly) the same names, and
all three report per-choice text, finish reasons and logprobs; only the JSON
shapes differ (built by the routes from `Choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HttpRequest

from server.api import generation as gen
from server.api.schemas import ResponseFormat, SamplingFields
from server.engine.grammar import Grammar, GrammarKind
from server.engine.request import FinishEvent, Request, TokenEvent, TokenLogprob
from server.errors import Unavailable
from server.api.services import Services


def decoding_options(body: SamplingFields, logprobs: int | None, grammar: Grammar | None) -> dict[str, Any]:
    """SamplingParams keyword arguments for the fields beyond temperature/top-p/top-k/seed/stop."""
    return dict(
        n=body.n, logprobs=logprobs, grammar=grammar, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
    )


async def compile_grammar(services: Services, kind: GrammarKind | None, source: Any, field_name: str) -> Grammar | None:
    """The compiled grammar for a constraint (off the engine thread, cached), or None without one."""
    if kind is None:
        return None
    return await services.grammars.get(kind, source, field_name)


def response_format_grammar(fmt: ResponseFormat | None) -> tuple[GrammarKind | None, Any]:
    """OpenAI `response_format` → (grammar kind, source); type "text" is no constraint."""
    if fmt is None or fmt.type == "text":
        return None, None
    if fmt.type == "json_object":
        return "json_object", None
    assert fmt.json_schema is not None
    return "json_schema", fmt.json_schema.schema_


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those whose KV came from the prefix cache

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


async def collect(services: Services, job: Request, http: HttpRequest) -> Result:
    """Run the request to its end: every choice's text, finish reason and logprobs; the prompt counted once."""
    result = Result([Choice(i) for i in range(job.params.n)])
    finished = 0
    async for event in gen.events(services, job, http):
        choice = result.choices[event.index] if isinstance(event, TokenEvent | FinishEvent) else None
        if isinstance(event, TokenEvent) and choice is not None:
            choice.text += event.text
            choice.logprobs.extend(event.logprobs)
        elif isinstance(event, FinishEvent) and choice is not None:
            choice.finish_reason, choice.completion_tokens = event.finish_reason, event.completion_tokens
            result.prompt_tokens = event.prompt_tokens
            result.cached_tokens = max(result.cached_tokens, event.cached_tokens)  # n > 1: the first one reused
            finished += 1
    if finished < job.params.n:
        raise Unavailable("the generation ended without a result")
    return result


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache (not computed)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Token id → its text (decoded alone) and UTF-8 bytes, cached: logprobs name every alternative."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                                                 clean_up_tokenization_spaces=False)
        return text


def native_logprobs(lps: list[TokenLogprob], text: TokenText) -> list[dict[str, Any]]:
    """/generate: [{token_id, token, logprob, top_logprobs: [{token_id, token, logprob}]}]."""
    return [{"token_id": lp.token_id, "token": text(lp.token_id), "logprob": lp.logprob,
             "top_logprobs": [{"token_id": t, "token": text(t), "logprob": v} for t, v in lp.top]} for lp in lps]


def completion_logprobs(lps: list[TokenLogprob], text: TokenText, offset: int = 0) -> dict[str, Any]:
    """OpenAI completions: {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}."""
    tokens = [text(lp.token_id) for lp in lps]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], text: TokenText) -> dict[str, Any]:
    """OpenAI chat: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}

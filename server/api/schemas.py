"""Request/response bodies of the generation routes (native and OpenAI-compatible).

Range checks that do not depend on the model live here (pydantic names the
field in the 4xx message); checks that need the tokenizer or the settings
(context length, max_new_tokens limit, stop-string limits) happen in
server/api/generation.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.adapters.weights.mix import MAX_MIX_MEMBERS

SEED_MAX = 2**63 - 1

Stop = str | list[str] | None


def normalize_stop(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those served from the prefix cache (not computed)


class MixMemberField(BaseModel):
    """One member of a per-request adapter mix."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1)
    weight: float = Field(..., allow_inf_nan=False)


Mix = list[MixMemberField] | None
MIX_FIELD_DESCRIPTION = ("a weighted mix of the caller's adapters, served as one adapter: "
                         f"1 to {MAX_MIX_MEMBERS} distinct ids, finite weights")


def check_mix(mix: Mix) -> Mix:
    if mix is not None:
        ids = [m.id for m in mix]
        if not 1 <= len(ids) <= MAX_MIX_MEMBERS:
            raise ValueError(f"a mix has 1 to {MAX_MIX_MEMBERS} members, got {len(ids)}")
        twice = next((i for n, i in enumerate(ids) if i in ids[:n]), None)
        if twice is not None:
            raise ValueError(f"{twice!r} is listed twice; give each member once with its weight")
    return mix


class MixRecipeRequest(BaseModel):
    """POST /v1/adapters/{id}/mix: a new stored adapter from weighted members (PEFT's add_weighted_adapter)."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[MixMemberField] = Field(..., description=MIX_FIELD_DESCRIPTION)
    combination_type: Literal["cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
    density: float | None = Field(None, allow_inf_nan=False, description="ties, dare_*, magnitude_prune: kept fraction")
    majority_sign_method: Literal["total", "frequency"] | None = Field(None, description="ties, dare_ties")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="dare_*: the random pruning's seed (required)")

    _mix = field_validator("adapters")(check_mix)


class SamplingFields(BaseModel):
    """Fields shared by every generation route (OpenAI routes rename max_new_tokens).

    Unknown fields are refused by name (422 / OpenAI 400): a misspelt or future
    field must never be dropped silently.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 disables top-k (extension on OpenAI routes)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Stop = None
    stream: bool = False
    n: int = Field(1, ge=1, description="sequences sampled from the prompt (one prefill shared)")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False,
                                             description="HF/vLLM repetition penalty (extension on OpenAI routes)")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids are blocked before this many tokens")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
        return v


class GenerateRequest(SamplingFields):
    prompt: str = Field(..., min_length=1)
    adapter_id: str | None = None
    adapters: Mix = Field(None, description=MIX_FIELD_DESCRIPTION + "; not with adapter_id")
    max_new_tokens: int = Field(64, ge=1)
    logprobs: int | None = Field(None, ge=0, description="the chosen token's logprob and the top k alternatives")
    json_schema: dict[str, Any] | None = Field(None, description="the output is JSON valid against this schema")
    regex: str | None = Field(None, min_length=1, description="the output matches this regular expression")
    choice: list[str] | None = Field(None, min_length=1, description="the output is exactly one of these strings")

    _mix = field_validator("adapters")(check_mix)

    @model_validator(mode="after")
    def _one_constraint(self) -> "GenerateRequest":
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"at most one of json_schema, regex, choice (got {', '.join(given)})")
        if self.adapter_id is not None and self.adapters is not None:
            raise ValueError("give either adapter_id or adapters (a mix), not both")
        return self


class GenerateResponse(BaseModel):
    id: str
    adapter_id: str | None
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage  # the prompt counted once, completion tokens summed over the n choices
    logprobs: list[dict[str, Any]] | None = None  # with `logprobs`: one entry per token of the first choice
    choices: list[dict[str, Any]] | None = None  # with n > 1: every choice (the top-level fields are choice 0)


# --- OpenAI-compatible ------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self


def refuse(value: Any) -> Any:
    """OpenAI fields this server does not implement: named in a 400 when set, never ignored."""
    if value is not None:
        raise ValueError("not supported by this server")
    return value


class OpenAIFields(SamplingFields):
    model: str = Field(..., min_length=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # OpenAI's default and range
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end-user id for abuse tracking: logged nowhere, changes nothing
    adapters: Mix = Field(None, description=MIX_FIELD_DESCRIPTION + " (extension); `model` is then the base model")

    _mix = field_validator("adapters")(check_mix)


class CompletionRequest(OpenAIFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, description="the chosen token's logprob and the top k alternatives")
    best_of: int | None = Field(None, ge=1, description="only best_of = n (no ranking) is supported")
    suffix: str | None = None

    _refused = field_validator("suffix")(refuse)

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported (no server-side ranking)")
        return self

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)  # handed to the chat template as OpenAI defines it
    # OpenAI message fields not implemented here (tool calling, audio): a 400 naming the field when set.
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None
    refusal: Any = None

    _refused = field_validator("tool_calls", "tool_call_id", "function_call", "audio", "refusal")(refuse)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    metadata: dict[str, str] | None = None  # only stored with `store`, which is refused
    # OpenAI fields not implemented here: each is a 400 naming it when set.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    verbosity: Any = None
    store: Any = None

    _refused = field_validator("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio",
                               "modalities", "prediction", "reasoning_effort", "web_search_options", "service_tier",
                               "verbosity", "store")(refuse)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"name": m.name} if m.name is not None else {})} for m in self.messages]

"""Request/response bodies of the generation routes (native and OpenAI-compatible).

Range checks that do not depend on the model live here (pydantic names the
field in the 4xx message); checks that need the tokenizer or the settings
(context length, max_new_tokens limit, stop-string limits) happen in
server/api/generation.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_MAX = 2**63 - 1

Stop = str | list[str] | None


def normalize_stop(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class SamplingFields(BaseModel):
    """Fields shared by every generation route (OpenAI routes rename max_new_tokens)."""

    model_config = ConfigDict(extra="ignore")

    temperature: float = Field(0.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="0 disables top-k (extension on OpenAI routes)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: Stop = None
    stream: bool = False


class GenerateRequest(SamplingFields):
    prompt: str = Field(..., min_length=1)
    adapter_id: str | None = None
    max_new_tokens: int = Field(64, ge=1)


class GenerateResponse(BaseModel):
    id: str
    adapter_id: str | None
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage


# --- OpenAI-compatible ------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    model: str = Field(..., min_length=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)  # OpenAI's default and range
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream_options: StreamOptions | None = None
    # Accepted for compatibility; they do not change generation.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class CompletionRequest(OpenAIFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False

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
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

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

    def template_messages(self) -> list[dict[str, Any]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]

"""What a client asks a training job to do, and the checks that need no model.

The pydantic models give FastAPI its schema and 422s for shapes and ranges;
`check_spec` (spec + settings + base model) adds the limits that depend on the
running server. Both run before a job row exists, so a bad request leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, model_validator

from server.adapters.ids import check_adapter_id
from server.adapters.store.store import names_as_422
from server import json_input
from server.errors import InvalidRequest
from server.settings import Settings

MAX_TEXT_CHARS = 100_000  # one prompt/completion/message; token limits are checked later
MAX_BATCH_SIZE = 64
MAX_GRAD_ACCUM = 64
MAX_LEARNING_RATE = 1.0


class ChatMessage(PydanticModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class Example(PydanticModel):
    """Either a `prompt`/`completion` pair or chat `messages` ending with the assistant's answer."""

    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    completion: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "Example":
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise ValueError("give either prompt/completion or messages, not both")
            if len(self.messages) < 2 or self.messages[-1].role != "assistant":
                raise ValueError("messages need at least one turn before a final assistant message")
        elif self.prompt is None or self.completion is None:
            raise ValueError("an example needs prompt and completion (or messages)")
        elif not self.completion:
            raise ValueError("completion must not be empty")
        return self


class TrainingJobSpec(PydanticModel):
    """The body of POST /v1/training/jobs (API.md "Training" plus optional extras)."""

    model_config = ConfigDict(extra="forbid")
    adapter_id: str
    method: Literal["lora", "dora", "miss"] = "lora"
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False, description="LoRA scale numerator; default 2*rank")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=64)
    data: list[Example] = Field(default_factory=list)
    steps: int = Field(100, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False)
    batch_size: int = Field(4, ge=1, le=MAX_BATCH_SIZE)
    seed: int = Field(0, ge=0, le=2**62)
    # --- extras ------------------------------------------------------------
    use_rslora: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_accum: int = Field(1, ge=1, le=MAX_GRAD_ACCUM)
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    variant: Literal["balance", "mini", "bat"] = Field("balance", description="MiSS only")
    mini_r: int | None = Field(None, ge=1, description="MiSS mini: block width along out_features")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingJobSpec":
        if self.warmup_steps > self.steps:
            raise ValueError("warmup_steps must not exceed steps")
        if self.method == "miss" and self.variant == "mini" and self.mini_r is None:
            raise ValueError("MiSS variant 'mini' needs mini_r")
        if self.method != "miss" and (self.variant != "balance" or self.mini_r is not None):
            raise ValueError("variant and mini_r apply to method 'miss' only")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules has duplicates")
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def canonical_json(self) -> str:
        """Stable text of the request: what idempotency compares and what the job row stores."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def body_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def check_spec(spec: TrainingJobSpec, settings: Settings) -> None:
    """Limits that come from the server's settings (the model-dependent ones live in data/modules)."""
    with names_as_422():
        check_adapter_id(spec.adapter_id)
    if not spec.data:
        raise InvalidRequest("data is empty: give at least one example")
    if len(spec.data) > settings.max_train_examples:
        raise InvalidRequest(f"too many examples: {len(spec.data)} > {settings.max_train_examples}")
    if spec.rank > settings.max_rank:
        raise InvalidRequest(f"rank {spec.rank} exceeds the server's maximum {settings.max_rank}")
    if spec.steps > settings.max_train_steps:
        raise InvalidRequest(f"steps {spec.steps} exceeds the server's maximum {settings.max_train_steps}")


def parse_jsonl(text: str, limit: int, max_depth: int) -> list[dict[str, Any]]:
    """Lines of a JSONL upload as dicts (validated as `Example` by the caller); blank lines skipped.

    Each line's nesting is bounded (json_input): a line of `[` * 100000 is a 422, not a RecursionError."""
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(rows) >= limit:
            raise InvalidRequest(f"too many examples: more than {limit}")
        try:
            row = json_input.loads(line, max_depth)
        except ValueError as exc:
            raise InvalidRequest(f"data line {lineno} is not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise InvalidRequest(f"data line {lineno} is not a JSON object")
        rows.append(row)
    return rows

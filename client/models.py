"""Typed records mirroring API.md.

Parsing is tolerant on purpose: the contract lets the server add optional
fields, so unknown keys are kept in `raw` rather than rejected, and a missing
optional field becomes None instead of a crash in the user's script.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def items_of(body: Any, *keys: str) -> list[dict[str, Any]]:
    """The list inside a list response, whether bare or wrapped (`data`, `adapters`, ...)."""
    if isinstance(body, list):
        return [x for x in body if isinstance(x, dict)]
    if isinstance(body, dict):
        for key in (*keys, "data", "items"):
            if isinstance(body.get(key), list):
                return [x for x in body[key] if isinstance(x, dict)]
    return []


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Usage":
        d = d or {}
        return cls(_int(d.get("prompt_tokens")) or 0, _int(d.get("completion_tokens")) or 0)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability (and, for chosen tokens, the top alternatives)."""

    token_id: int | None
    token: str
    logprob: float
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLogprob":
        return cls(_int(d.get("token_id")), str(d.get("token") or ""), _float(d.get("logprob")) or 0.0,
                   [cls.from_dict(t) for t in d.get("top_logprobs") or [] if isinstance(t, dict)])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_id": self.token_id, "token": self.token, "logprob": self.logprob}
        if self.top_logprobs:
            out["top_logprobs"] = [t.to_dict() for t in self.top_logprobs]
        return out


def logprobs_of(value: Any) -> list[TokenLogprob]:
    return [TokenLogprob.from_dict(e) for e in value or [] if isinstance(e, dict)]


@dataclass(frozen=True)
class Choice:
    """One of the n sequences of a generation (`n` > 1)."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Choice":
        return cls(_int(d.get("index")) or 0, str(d.get("text") or ""), d.get("finish_reason"),
                   _int(d.get("completion_tokens")) or 0, logprobs_of(d.get("logprobs")))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "text": self.text, "finish_reason": self.finish_reason,
                               "completion_tokens": self.completion_tokens}
        if self.logprobs:
            out["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        return out


@dataclass(frozen=True)
class Generation:
    """The answer of `POST /generate` (or the summary of a finished stream).

    `text`, `finish_reason` and `logprobs` are the first choice's; `choices` holds every one
    (a single choice unless the request asked for n > 1); `usage` covers them all.
    """

    id: str | None
    adapter_id: str | None
    text: str
    finish_reason: str | None
    usage: Usage
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Generation":
        text, logprobs = str(d.get("text") or ""), logprobs_of(d.get("logprobs"))
        usage = Usage.from_dict(d.get("usage"))
        choices = [Choice.from_dict(c) for c in d.get("choices") or [] if isinstance(c, dict)]
        if not choices:
            choices = [Choice(0, text, d.get("finish_reason"), usage.completion_tokens, logprobs)]
        return cls(id=d.get("id"), adapter_id=d.get("adapter_id"), text=text, finish_reason=d.get("finish_reason"),
                   usage=usage, raw=d, logprobs=logprobs, choices=choices)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "adapter_id": self.adapter_id, "text": self.text,
                               "finish_reason": self.finish_reason,
                               "usage": {"prompt_tokens": self.usage.prompt_tokens,
                                         "completion_tokens": self.usage.completion_tokens}}
        if self.logprobs:
            out["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        if len(self.choices) > 1:
            out["choices"] = [c.to_dict() for c in self.choices]
        return out


@dataclass(frozen=True)
class Adapter:
    """An adapter record (`GET /v1/adapters/{id}`)."""

    id: str
    tenant: str | None = None
    type: str | None = None
    variant: str | None = None
    rank: int | None = None
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    sha256: str | None = None
    version: int | None = None
    created_at: Any = None  # as the server sends it (ISO string or epoch seconds)
    mode: str | None = None
    resident: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Adapter":
        return cls(id=str(d.get("id", "")), tenant=d.get("tenant"), type=d.get("type"),
                   variant=d.get("variant"), rank=_int(d.get("rank")),
                   target_modules=list(d.get("target_modules") or []), size_bytes=_int(d.get("size_bytes")),
                   sha256=d.get("sha256"), version=_int(d.get("version")), created_at=d.get("created_at"),
                   mode=d.get("mode"), resident=d.get("resident"), raw=d)


@dataclass(frozen=True)
class TrainingJob:
    """A training job record: status, progress (step/steps), loss history, error."""

    id: str
    status: str
    adapter_id: str | None = None
    method: str | None = None
    tenant: str | None = None
    step: int = 0
    steps: int | None = None
    loss_history: list[float] = field(default_factory=list)
    error: str | None = None
    created_at: Any = None
    started_at: Any = None
    finished_at: Any = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES

    @property
    def loss(self) -> float | None:
        """The latest recorded loss."""
        return self.loss_history[-1] if self.loss_history else None

    @property
    def fraction(self) -> float | None:
        return None if not self.steps else min(1.0, self.step / self.steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingJob":
        progress = d.get("progress") if isinstance(d.get("progress"), dict) else {}
        spec = next((d[k] for k in ("params", "spec") if isinstance(d.get(k), dict)), {})
        steps = progress.get("steps", d.get("steps", spec.get("steps")))
        return cls(
            id=str(d.get("id", "")), status=str(d.get("status", "unknown")),
            adapter_id=d.get("adapter_id", spec.get("adapter_id")), method=d.get("method", spec.get("method")),
            tenant=d.get("tenant"), step=_int(progress.get("step", d.get("step"))) or 0, steps=_int(steps),
            loss_history=_losses(d, progress), error=_error_text(d.get("error")),
            created_at=d.get("created_at"), started_at=d.get("started_at"),
            finished_at=d.get("finished_at"), raw=d,
        )


def _losses(d: dict[str, Any], progress: dict[str, Any]) -> list[float]:
    """Loss history as floats, from a list of numbers or of {"step", "loss"} points."""
    history = d.get("loss_history", progress.get("loss_history", d.get("losses")))
    out: list[float] = []
    for point in history or []:
        value = _float(point.get("loss") if isinstance(point, dict) else point)
        if value is not None:
            out.append(value)
    if not out:
        latest = _float(progress.get("loss", d.get("loss")))
        if latest is not None:
            out.append(latest)
    return out


def _error_text(error: Any) -> str | None:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return None if error in (None, "") else str(error)


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `GET /v1/models`: the base model or one of the caller's adapters."""

    id: str
    owned_by: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelInfo":
        return cls(id=str(d.get("id", "")), owned_by=d.get("owned_by"), raw=d)

"""A running request's engine-side state: its KV row, adapter slot, progress, text.

Only the engine thread touches a Sequence. Positions: the prompt occupies cache
positions [0, prompt_len); the i-th generated token (0-based) is fed back at
position prompt_len + i, so a decode step's input position is
prompt_len + generated - 1.

Preemption (server/engine/preemption.py) frees a running sequence's KV row but
keeps this object, with everything sampling depends on (generator, detokenizer,
grammar matcher, output so far); when it gets a row again it first recomputes
`resume_ids` = prompt + output[:-1] (a prefill that samples nothing), then
decodes on from `last_token` as if it had never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.adapters.runtime.mapping import BASE_SLOT
from server.engine.detokenizer import Detokenizer
from server.engine.request import Request


@dataclass(eq=False)
class Sequence:
    request: Request
    row: int  # KV-cache row owned while running (a preempted sequence gets another one back)
    detok: Detokenizer
    generator: torch.Generator | None  # per-request RNG (CPU); None for greedy
    slot: int = BASE_SLOT  # adapter device slot of every token of this sequence
    lane: int | None = None  # merged copy of the base this sequence runs on (None = shared lane)
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of those, tokens copied from the prefix cache at admission
    generated: int = 0  # tokens sampled so far
    output: list[int] = field(default_factory=list)  # every sampled id (what a resumed row recomputes)
    resume_ids: list[int] | None = None  # after a preemption: the tokens to recompute before decoding on
    preemptions: int = 0  # times this sequence was preempted (bounded: no livelock)
    last_token: int = -1  # the token the next decode step feeds in
    unsent: list[int] = field(default_factory=list)  # sampled ids not yet reported in an event
    unsent_logprobs: list[Any] = field(default_factory=list)  # TokenLogprob per unsent id (when asked)
    index: int = 0  # which of the request's n sequences
    # n > 1: the first sequence prefills for all; the others wait (not scheduled) until it is done, then
    # take a copy of its KV row and sample from its last prompt logits.
    forks: list["Sequence"] = field(default_factory=list)
    awaiting_fork: bool = False
    matcher: Any = None  # grammar matcher (server.engine.grammar) when the output is constrained
    # Sampling this row needs more than the plain path (penalties, logprobs, a grammar); fixed for its life,
    # so a plain step costs one flag read per row.
    special: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        p = self.request.params
        self.special = self.matcher is not None or p.logprobs is not None or p.penalized

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def fill_len(self) -> int:
        """Tokens to get into the KV row before decoding: the prompt, or what a resumed row recomputes."""
        return self.prompt_len if self.resume_ids is None else len(self.resume_ids)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.fill_len

    def suspend(self) -> None:
        """Preempted: the row is gone; what it held is recomputed when the sequence runs again."""
        self.resume_ids = [*self.request.prompt_ids, *self.output[:-1]] if self.generated else None
        self.prefilled = 0
        self.preemptions += 1

    @property
    def position(self) -> int:
        """Absolute position of the next decode input token."""
        return self.prompt_len + self.generated - 1

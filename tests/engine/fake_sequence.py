"""A stand-in for an engine Sequence with just the fields the Runner reads, for tests that drive the
Runner directly (no scheduler)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class FakeSequence:
    prompt_ids: list[int]
    row: int
    slot: int = -1
    prefilled: int = 0
    generated: int = 0
    last_token: int = 5

    @property
    def request(self) -> "FakeSequence":
        return self

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def position(self) -> int:
        return self.prompt_len + self.generated - 1

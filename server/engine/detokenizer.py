"""Incremental detokenization with stop strings and partial-stop holdback.

Why incremental: decoding the whole output every step is O(length) Python work
per token. Instead each step decodes a short window (the last read tokens plus
the new one) and appends the difference, as vLLM/TGI do. A multi-byte character
split across tokens shows up as U+FFFD and is held until it completes.

Stop strings are searched only in the tail that new text could complete, and
text that might be the start of a stop string is held back from streaming until
it is clearly not one, so no client ever sees text past a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 5  # prompt tail kept so the first token decodes with its leading space


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # generated text so far, truncated at a stop string once one is seen
        self.emitted = 0  # chars of `text` already handed to the client
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        """Append one generated token; sets `stopped` when a stop string completes."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        if not self.stop:
            return
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def take(self, final: bool = False) -> str:
        """Text that is safe to send now (everything, once the request is finished)."""
        if final and not self.stopped:
            tail = self._decode(self.ids[self.prefix_offset:])
            head = self._decode(self.ids[self.prefix_offset:self.read_offset])
            if len(tail) > len(head):  # a trailing incomplete character: flush it as-is
                self._append(tail[len(head):])
                self.read_offset = len(self.ids)
        end = len(self.text) if final or self.stopped else len(self.text) - self._holdback()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

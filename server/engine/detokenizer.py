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
        # Only a bounded window of text is kept: what is not sent yet plus enough
        # sent context for a stop string to straddle the boundary. `sent` chars
        # of `buf` have been handed out.
        self.buf = ""
        self.sent = 0
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
        start = max(0, len(self.buf) - self.max_stop + 1)
        self.buf += delta
        if not self.stop:
            return
        hits = [i for i in (self.buf.find(s, start) for s in self.stop) if i >= 0]
        if hits:  # never before `sent`: text that could start a stop string was held back
            self.buf = self.buf[:min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.buf)), best, -1):
                if self.buf.endswith(s[:k]):
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
        end = len(self.buf) if final or self.stopped else len(self.buf) - self._holdback()
        out = self.buf[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        cut = min(self.sent, max(0, len(self.buf) - self.max_stop))
        if cut:
            self.buf = self.buf[cut:]
            self.sent -= cut
        return out

"""Prompt text to token ids: never more work than the context allows, a bounded number at once.

Why: a prompt of a few MB (under the body limit) used to be tokenized whole
before the context check (one request +0.75 GB RSS, a dozen at once ~10 GB).
Now a prompt longer in characters than the context could ever hold is refused
before tokenizing; the tokenizer truncates at context + 1 tokens (enough for
the context check to fire); and tokenization runs on a small thread pool of
its own, off the event loop, so concurrent requests queue instead of each
holding a tokenizer's working memory. Short prompts (the common case) are
tokenized on the loop itself: the hop there and back would cost more than the work.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from server.errors import ApiError, InvalidRequest


class Tokenizer(Protocol):
    chat_template: Any

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def get_vocab(self) -> dict[str, int]: ...

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> Any: ...


def max_token_chars(tokenizer: Tokenizer) -> int:
    """The longest vocabulary entry in characters: no token covers more of a prompt than this.

    (Byte-level vocabularies spell each byte as one character, and a prompt
    character is at least one byte, so the bound holds for them too.)
    """
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


# Prompts up to this many characters are tokenized on the event loop (well under a millisecond): a hop to
# the pool thread and back costs two GIL hand-offs, each up to a switch interval (5 ms) while the engine
# thread runs a step, which under load was most of a short request's time to first token.
INLINE_CHARS = 2048


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer, max_context: int, workers: int,
                 inline_chars: int = INLINE_CHARS) -> None:
        """`inline_chars`: prompts up to this many characters are tokenized on the calling event loop."""
        self.tokenizer = tokenizer
        self.inline_chars = inline_chars
        self.max_context = max_context
        self.max_chars = max_context * max_token_chars(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraplex-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _check_chars(self, chars: int, field: str) -> None:
        if chars > self.max_chars:
            raise InvalidRequest(f"{field}: {chars} characters cannot fit the model's context of "
                                 f"{self.max_context} tokens (at most {self.max_chars} characters)")

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        # context + 1: a prompt that does not fit still shows as too long to the context check
        out = self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                             max_length=self.max_context + 1)
        return list(out["input_ids"])

    async def _run(self, fn: Any, chars: int) -> Any:
        if chars <= self.inline_chars:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def encode(self, prompt: str) -> list[int]:
        self._check_chars(len(prompt), "prompt")
        ids = await self._run(lambda: self._ids(prompt, True), len(prompt))
        if not ids:
            raise InvalidRequest("prompt: the prompt encodes to zero tokens")
        return ids

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self.tokenizer
        if not tokenizer.chat_template:
            raise InvalidRequest("messages: the base model's tokenizer has no chat template")
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        self._check_chars(chars, "messages")

        def render() -> list[int]:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self._ids(text, False)

        try:
            return await self._run(render, chars)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the caller's
            raise InvalidRequest(f"messages: the chat template rejected them: {exc}") from None

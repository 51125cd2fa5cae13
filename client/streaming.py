"""Server-sent events from `POST /generate` with `stream: true`.

`StreamDecoder` is the shared, I/O-free parser: it is fed lines and hands back
text deltas, remembering the final event's `finish_reason` and `usage`.
`GenerateStream` / `AsyncGenerateStream` only pump lines from httpx into it.
Iterating yields the deltas; afterwards `.finish_reason`, `.usage`, `.text`
and `.result()` describe the whole generation.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from client.errors import ConnectionFailedError, LoraplexError, error_class
from client.models import Choice, Generation, TokenLogprob, Usage, logprobs_of


class StreamDecoder:
    def __init__(self) -> None:
        self._data: list[str] = []
        self.parts: list[str] = []
        self.id: str | None = None
        self.adapter_id: str | None = None
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.done = False
        self.logprobs: list[TokenLogprob] = []  # the first choice's
        # n > 1: events carry `index`; deltas yielded and `parts` are choice 0's, the rest are kept per index
        self.texts: dict[int, list[str]] = {}
        self.finishes: dict[int, str] = {}
        self.choice_logprobs: dict[int, list[TokenLogprob]] = {}

    def feed(self, line: str) -> list[str]:
        """One line of the body (without its newline); returns the deltas it completes."""
        line = line.rstrip("\r")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # comment / keep-alive
            return []
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return []

    def close(self) -> list[str]:
        """End of body: flush a last event that had no trailing blank line."""
        return self._dispatch()

    def _dispatch(self) -> list[str]:
        if not self._data:
            return []
        payload = "\n".join(self._data)
        self._data = []
        if payload.strip() == "[DONE]":
            self.done = True
            return []
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise LoraplexError(f"malformed stream event: {payload[:200]!r}") from exc
        return self._apply(event) if isinstance(event, dict) else []

    def _apply(self, event: dict[str, Any]) -> list[str]:
        if isinstance(event.get("error"), dict):
            err = event["error"]
            status = int(err.get("status") or event.get("status") or 500)
            raise error_class(status)(str(err.get("message") or "stream failed"), status=status,
                                      type=str(err.get("type") or "error"), body=event)
        self.id = event.get("id", self.id)
        self.adapter_id = event.get("adapter_id", self.adapter_id)
        index = event.get("index") if isinstance(event.get("index"), int) else 0
        if event.get("finish_reason") is not None:
            self.finishes[index] = event["finish_reason"]
            if index == 0:
                self.finish_reason = event["finish_reason"]
        if isinstance(event.get("usage"), dict):
            self.usage = Usage.from_dict(event["usage"])
        self.choice_logprobs.setdefault(index, []).extend(logprobs_of(event.get("logprobs")))
        text = event.get("text")
        if isinstance(text, str) and text:
            self.texts.setdefault(index, []).append(text)
            if index == 0:
                self.parts.append(text)
                return [text]
        return []

    def check_complete(self) -> None:
        if not self.done and self.finish_reason is None:
            raise ConnectionFailedError("the stream ended before the server finished the generation")

    def result(self) -> Generation:
        indices = sorted({0, *self.texts, *self.finishes})
        choices = [Choice(i, "".join(self.texts.get(i, [])), self.finishes.get(i), 0,
                          self.choice_logprobs.get(i, [])) for i in indices]
        return Generation(id=self.id, adapter_id=self.adapter_id, text="".join(self.parts),
                          finish_reason=self.finish_reason, usage=self.usage,
                          logprobs=self.choice_logprobs.get(0, []), choices=choices)


class _StreamBase:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._decoder = StreamDecoder()

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._decoder.parts)

    @property
    def finish_reason(self) -> str | None:
        return self._decoder.finish_reason

    @property
    def usage(self) -> Usage:
        return self._decoder.usage

    def result(self) -> Generation:
        """The whole generation; complete once iteration has ended."""
        return self._decoder.result()


class GenerateStream(_StreamBase):
    """Iterate for text deltas; use as a context manager to close early."""

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self.response.iter_lines():
                yield from self._decoder.feed(line)
            yield from self._decoder.close()
            self._decoder.check_complete()
        except httpx.TransportError as exc:
            raise ConnectionFailedError(f"stream interrupted: {type(exc).__name__}: {exc}") from exc
        finally:
            self.response.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerateStream(_StreamBase):
    """`async for` text deltas; use as an async context manager to close early."""

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self.response.aiter_lines():
                for delta in self._decoder.feed(line):
                    yield delta
            for delta in self._decoder.close():
                yield delta
            self._decoder.check_complete()
        except httpx.TransportError as exc:
            raise ConnectionFailedError(f"stream interrupted: {type(exc).__name__}: {exc}") from exc
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncGenerateStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

"""Configuration shared by `Client` and `AsyncClient` (everything but the driver)."""

from __future__ import annotations

import os
from typing import Any

import httpx

from client import ops
from client.config import as_timeout, default_headers, resolve_api_key, resolve_url
from client.data import TrainingData, read_bytes
from client.retry import RetryPolicy


class ClientBase:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, retry: RetryPolicy | int | None = None) -> None:
        self.base_url = resolve_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.retry = retry if isinstance(retry, RetryPolicy) else RetryPolicy(max_attempts=retry or 4)
        self._http_options: dict[str, Any] = dict(
            base_url=self.base_url, headers=default_headers(self.api_key), timeout=as_timeout(timeout))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    @staticmethod
    def _training_request(adapter_id: str, data: TrainingData,
                          **options: Any) -> tuple[dict[str, Any], bytes | None]:
        """(JSON body, JSONL bytes): a path is sent as the file itself, a list inline."""
        if isinstance(data, (str, os.PathLike)):
            return ops.training_payload(adapter_id, [], **options), read_bytes(data)
        return ops.training_payload(adapter_id, list(data), **options), None

"""The asyncio client: the same operations as `Client`, run with `run_async`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from client import ops
from client.base import ClientBase
from client.data import TrainingData
from client.models import Adapter, Generation, ModelInfo, TrainingJob
from client.retry import RetryPolicy
from client.streaming import AsyncGenerateStream
from client.transport import Op, T, run_async


class AsyncClient(ClientBase):
    """`Client(base_url=None, api_key=None)`; defaults come from LORAPLEX_URL / LORAPLEX_API_KEY.

    Use as an async context manager (or await `aclose()`); `on_progress` may be async.
    `transport` swaps httpx's network layer (tests, proxies, unix sockets).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, retry: RetryPolicy | int | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout=timeout, retry=retry)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)

    async def _run(self, op: Op[T]) -> T:
        return await run_async(op, self._http)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- operations ------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self._run(ops.health(self.retry))

    async def ready(self) -> bool:
        return await self._run(ops.ready())

    async def models(self) -> list[ModelInfo]:
        return await self._run(ops.models(self.retry))

    async def generate(self, prompt: str, *, adapter_id: str | None = None,
                       max_new_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                       stop: list[str] | None = None, **extra: Any) -> Generation:
        body = ops.generation_payload(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                      stop=stop, **extra)
        return await self._run(ops.generate(self.retry, body))

    async def generate_stream(self, prompt: str, *, adapter_id: str | None = None,
                              max_new_tokens: int | None = None, temperature: float | None = None,
                              top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                              stop: list[str] | None = None, **extra: Any) -> AsyncGenerateStream:
        """`async for` over the result for text deltas; then `.finish_reason`, `.usage`, `.result()`."""
        body = ops.generation_payload(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                      stop=stop, **extra)
        return AsyncGenerateStream(await self._run(ops.generate_stream(self.retry, body)))

    async def upload_adapter(self, adapter_id: str, path: str | Path) -> Adapter:
        """Upload a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
        return await self._run(ops.upload_adapter(self.retry, adapter_id, path))

    async def list_adapters(self, tenant: str | None = None) -> list[Adapter]:
        return await self._run(ops.list_adapters(self.retry, tenant))

    async def get_adapter(self, adapter_id: str) -> Adapter:
        return await self._run(ops.get_adapter(self.retry, adapter_id))

    async def delete_adapter(self, adapter_id: str) -> None:
        await self._run(ops.delete_adapter(self.retry, adapter_id))

    async def merge_adapter(self, adapter_id: str) -> Adapter:
        return await self._run(ops.set_merged(self.retry, adapter_id, True))

    async def unmerge_adapter(self, adapter_id: str) -> Adapter:
        return await self._run(ops.set_merged(self.retry, adapter_id, False))

    async def submit_training(self, adapter_id: str, data: TrainingData, *, method: str = "lora",
                              rank: int | None = None, alpha: float | None = None,
                              target_modules: list[str] | None = None, steps: int | None = None,
                              learning_rate: float | None = None, batch_size: int | None = None,
                              seed: int | None = None, idempotency_key: str | None = None,
                              **extra: Any) -> TrainingJob:
        """`data`: a list of {"prompt", "completion"} dicts, or the path of a JSONL file of them."""
        body, jsonl = self._training_request(adapter_id, data, method=method, rank=rank, alpha=alpha,
                                             target_modules=target_modules, steps=steps, learning_rate=learning_rate,
                                             batch_size=batch_size, seed=seed, **extra)
        return await self._run(ops.submit_training(self.retry, body, idempotency_key, jsonl))

    async def get_job(self, job_id: str) -> TrainingJob:
        return await self._run(ops.get_job(self.retry, job_id))

    async def list_jobs(self, tenant: str | None = None) -> list[TrainingJob]:
        return await self._run(ops.list_jobs(self.retry, tenant))

    async def cancel_job(self, job_id: str) -> TrainingJob:
        return await self._run(ops.cancel_job(self.retry, job_id))

    async def wait(self, job_id: str, on_progress: ops.ProgressCallback | None = None, *,
                   poll_interval: float = 1.0, timeout: float | None = None) -> TrainingJob:
        """Block until the job ends (any terminal status); `on_progress(job)` on every change."""
        return await self._run(ops.wait_job(self.retry, job_id, on_progress, poll_interval, timeout))

"""The synchronous client: every method runs the shared operation with `run_sync`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from client import ops
from client.base import ClientBase
from client.data import TrainingData
from client.models import Adapter, Generation, ModelInfo, TrainingJob
from client.retry import RetryPolicy
from client.streaming import GenerateStream
from client.transport import Op, T, run_sync


class Client(ClientBase):
    """`Client(base_url=None, api_key=None)`; defaults come from LORAPLEX_URL / LORAPLEX_API_KEY.

    Use as a context manager (or call `close()`) to release the connection pool.
    `transport` swaps httpx's network layer (tests, proxies, unix sockets).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout | None = None, retry: RetryPolicy | int | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout=timeout, retry=retry)
        self._http = httpx.Client(transport=transport, **self._http_options)

    def _run(self, op: Op[T]) -> T:
        return run_sync(op, self._http)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations ------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._run(ops.health(self.retry))

    def ready(self) -> bool:
        return self._run(ops.ready())

    def models(self) -> list[ModelInfo]:
        return self._run(ops.models(self.retry))

    def generate(self, prompt: str, *, adapter_id: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop: list[str] | None = None, **extra: Any) -> Generation:
        body = ops.generation_payload(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                      stop=stop, **extra)
        return self._run(ops.generate(self.retry, body))

    def generate_stream(self, prompt: str, *, adapter_id: str | None = None, max_new_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                        seed: int | None = None, stop: list[str] | None = None,
                        **extra: Any) -> GenerateStream:
        """Iterate the result for text deltas; then `.finish_reason`, `.usage`, `.result()`."""
        body = ops.generation_payload(prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                      stop=stop, **extra)
        return GenerateStream(self._run(ops.generate_stream(self.retry, body)))

    def upload_adapter(self, adapter_id: str, path: str | Path) -> Adapter:
        """Upload a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
        return self._run(ops.upload_adapter(self.retry, adapter_id, path))

    def list_adapters(self, tenant: str | None = None) -> list[Adapter]:
        return self._run(ops.list_adapters(self.retry, tenant))

    def get_adapter(self, adapter_id: str) -> Adapter:
        return self._run(ops.get_adapter(self.retry, adapter_id))

    def delete_adapter(self, adapter_id: str) -> None:
        self._run(ops.delete_adapter(self.retry, adapter_id))

    def merge_adapter(self, adapter_id: str) -> Adapter:
        return self._run(ops.set_merged(self.retry, adapter_id, True))

    def unmerge_adapter(self, adapter_id: str) -> Adapter:
        return self._run(ops.set_merged(self.retry, adapter_id, False))

    def submit_training(self, adapter_id: str, data: TrainingData, *, method: str = "lora",
                        rank: int | None = None, alpha: float | None = None,
                        target_modules: list[str] | None = None, steps: int | None = None,
                        learning_rate: float | None = None, batch_size: int | None = None,
                        seed: int | None = None, idempotency_key: str | None = None,
                        **extra: Any) -> TrainingJob:
        """`data`: a list of {"prompt", "completion"} dicts, or the path of a JSONL file of them."""
        body, jsonl = self._training_request(adapter_id, data, method=method, rank=rank, alpha=alpha,
                                             target_modules=target_modules, steps=steps, learning_rate=learning_rate,
                                             batch_size=batch_size, seed=seed, **extra)
        return self._run(ops.submit_training(self.retry, body, idempotency_key, jsonl))

    def get_job(self, job_id: str) -> TrainingJob:
        return self._run(ops.get_job(self.retry, job_id))

    def list_jobs(self, tenant: str | None = None) -> list[TrainingJob]:
        return self._run(ops.list_jobs(self.retry, tenant))

    def cancel_job(self, job_id: str) -> TrainingJob:
        return self._run(ops.cancel_job(self.retry, job_id))

    def wait(self, job_id: str, on_progress: ops.ProgressCallback | None = None, *,
             poll_interval: float = 1.0, timeout: float | None = None) -> TrainingJob:
        """Block until the job ends (any terminal status); `on_progress(job)` on every change."""
        return self._run(ops.wait_job(self.retry, job_id, on_progress, poll_interval, timeout))

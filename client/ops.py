"""Every API operation, written once as a driver-agnostic generator (see transport.py).

Each function builds its request(s) from Python arguments, yields them, and
parses the answer into a typed record. `Client` and `AsyncClient` are thin
shells that run these with their own driver.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from client.errors import InvalidInputError, UnavailableError, WaitTimeoutError
from client.models import Adapter, Generation, ModelInfo, TrainingJob, items_of
from client.retry import NO_RETRY, RetryPolicy
from client.transport import HttpRequest, Op, Sleep, maybe_await, send

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

ProgressCallback = Callable[[TrainingJob], Any]


def segment(value: str) -> str:
    """One URL path segment; dots-only ids are escaped so no layer resolves them as `..`."""
    quoted = quote(str(value), safe="")
    return quoted.replace(".", "%2E") if set(str(value)) <= {"."} else quoted


def _json(response: httpx.Response) -> Any:
    return response.json() if response.content else None


DECODING_OPTIONS = ("n", "logprobs", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias",
                    "min_tokens", "stop_token_ids", "ignore_eos", "json_schema", "regex", "choice")


def generation_payload(prompt: str, *, adapter_id: str | None = None, max_new_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, stop: list[str] | None = None,
                       **extra: Any) -> dict[str, Any]:
    """The `POST /generate` body; None means "the server's default" and is left out.

    `extra` carries the decoding options by their API names (DECODING_OPTIONS: n, logprobs,
    penalties, logit_bias as {token id: bias}, min_tokens, stop_token_ids, ignore_eos,
    json_schema / regex / choice, and `adapters`: a weighted mix as {adapter id: weight} or the API's
    [{"id", "weight"}] list, instead of adapter_id); the server refuses a name it does not know.
    """
    if isinstance(extra.get("logit_bias"), dict):
        extra["logit_bias"] = {str(k): v for k, v in extra["logit_bias"].items()}
    if isinstance(extra.get("adapters"), Mapping):  # a weighted mix given as {adapter id: weight}
        extra["adapters"] = [{"id": i, "weight": w} for i, w in extra["adapters"].items()]
    body = dict(prompt=prompt, adapter_id=adapter_id, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, seed=seed, stop=stop, **extra)
    return {k: v for k, v in body.items() if v is not None or k == "adapter_id"}


def training_payload(adapter_id: str, data: list[dict[str, Any]], *, method: str = "lora",
                     rank: int | None = None, alpha: float | None = None,
                     target_modules: list[str] | None = None, steps: int | None = None,
                     learning_rate: float | None = None, batch_size: int | None = None,
                     seed: int | None = None, **extra: Any) -> dict[str, Any]:
    body = dict(adapter_id=adapter_id, method=method, rank=rank, alpha=alpha, target_modules=target_modules,
                data=data, steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, **extra)
    return {k: v for k, v in body.items() if v is not None}


# --- operations ---------------------------------------------------------------------------

def health(policy: RetryPolicy) -> Op[dict[str, Any]]:
    response = yield from send(HttpRequest("GET", "/health"), policy)
    body = _json(response)
    return body if isinstance(body, dict) else {"status": "ok"}


def ready() -> Op[bool]:
    """True when the model is loaded and requests are admitted; a 503 is an answer, not an error."""
    try:
        yield from send(HttpRequest("GET", "/ready"), NO_RETRY)
    except UnavailableError:
        return False
    return True


def models(policy: RetryPolicy) -> Op[list[ModelInfo]]:
    response = yield from send(HttpRequest("GET", "/v1/models"), policy)
    return [ModelInfo.from_dict(d) for d in items_of(_json(response), "models")]


def generate(policy: RetryPolicy, body: dict[str, Any]) -> Op[Generation]:
    response = yield from send(HttpRequest("POST", "/generate", json={**body, "stream": False}), policy)
    return Generation.from_dict(_json(response) or {})


def generate_stream(policy: RetryPolicy, body: dict[str, Any]) -> Op[httpx.Response]:
    """The open event-stream response; retries cover only the answer's status, not a broken stream."""
    req = HttpRequest("POST", "/generate", json={**body, "stream": True},
                      headers={"Accept": "text/event-stream"}, stream=True)
    return (yield from send(req, policy))


def upload_adapter(policy: RetryPolicy, adapter_id: str, path: str | Path) -> Op[Adapter]:
    files = read_adapter_dir(Path(path))
    req = HttpRequest("PUT", f"/v1/adapters/{segment(adapter_id)}", files=files)
    response = yield from send(req, policy)
    return Adapter.from_dict(_json(response) or {})


def read_adapter_dir(path: Path) -> dict[str, tuple[str, bytes, str]]:
    """The two multipart parts of an upload, from a directory PEFT's `save_pretrained` wrote."""
    if not path.is_dir():
        raise InvalidInputError(f"{path} is not a directory (expected a PEFT adapter directory)")
    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config.is_file():
        raise InvalidInputError(f"{path} has no {ADAPTER_CONFIG}")
    if not weights.is_file():
        pickled = [p for p in PICKLED_WEIGHTS if (path / p).exists()]
        hint = (f" (found {pickled[0]}: pickled weights are refused; save with safe_serialization=True)"
                if pickled else "")
        raise InvalidInputError(f"{path} has no {ADAPTER_WEIGHTS}{hint}")
    return {"config": (ADAPTER_CONFIG, config.read_bytes(), "application/json"),
            "weights": (ADAPTER_WEIGHTS, weights.read_bytes(), "application/octet-stream")}


def list_adapters(policy: RetryPolicy, tenant: str | None = None) -> Op[list[Adapter]]:
    params = {"tenant": tenant} if tenant else None
    response = yield from send(HttpRequest("GET", "/v1/adapters", params=params), policy)
    return [Adapter.from_dict(d) for d in items_of(_json(response), "adapters")]


def get_adapter(policy: RetryPolicy, adapter_id: str) -> Op[Adapter]:
    response = yield from send(HttpRequest("GET", f"/v1/adapters/{segment(adapter_id)}"), policy)
    return Adapter.from_dict(_json(response) or {})


def delete_adapter(policy: RetryPolicy, adapter_id: str) -> Op[None]:
    yield from send(HttpRequest("DELETE", f"/v1/adapters/{segment(adapter_id)}"), policy)


def set_merged(policy: RetryPolicy, adapter_id: str, merged: bool) -> Op[Adapter]:
    """Merge (POST) or unmerge (DELETE); returns the adapter record after the change."""
    path = f"/v1/adapters/{segment(adapter_id)}/merge"
    req = HttpRequest("POST" if merged else "DELETE", path, retry_safe=True)  # merging twice is harmless
    response = yield from send(req, policy)
    body = _json(response)
    record = body.get("adapter", body) if isinstance(body, dict) else None
    if isinstance(record, dict) and record.get("id"):
        return Adapter.from_dict(record)
    return (yield from get_adapter(policy, adapter_id))


def submit_training(policy: RetryPolicy, body: dict[str, Any], idempotency_key: str | None,
                    jsonl: bytes | None = None) -> Op[TrainingJob]:
    """Inline examples go in the JSON body; a JSONL file goes as multipart (`spec` + `data`).

    A key is always sent (a fresh one if none given) so our own retries never double-submit.
    """
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    if jsonl is None:
        req = HttpRequest("POST", "/v1/training/jobs", json=body, headers=headers)
    else:
        spec = json.dumps({k: v for k, v in body.items() if k != "data"})
        req = HttpRequest("POST", "/v1/training/jobs/upload", data={"spec": spec},
                          files={"data": ("data.jsonl", jsonl, "application/x-ndjson")}, headers=headers)
    response = yield from send(req, policy)
    return TrainingJob.from_dict(_json(response) or {})


def get_job(policy: RetryPolicy, job_id: str) -> Op[TrainingJob]:
    response = yield from send(HttpRequest("GET", f"/v1/training/jobs/{segment(job_id)}"), policy)
    return TrainingJob.from_dict(_json(response) or {})


def list_jobs(policy: RetryPolicy, tenant: str | None = None) -> Op[list[TrainingJob]]:
    params = {"tenant": tenant} if tenant else None
    response = yield from send(HttpRequest("GET", "/v1/training/jobs", params=params), policy)
    return [TrainingJob.from_dict(d) for d in items_of(_json(response), "jobs")]


def cancel_job(policy: RetryPolicy, job_id: str) -> Op[TrainingJob]:
    req = HttpRequest("POST", f"/v1/training/jobs/{segment(job_id)}/cancel", retry_safe=True)
    response = yield from send(req, policy)
    body = _json(response)
    if isinstance(body, dict) and body.get("id"):
        return TrainingJob.from_dict(body)
    return (yield from get_job(policy, job_id))


def wait_job(policy: RetryPolicy, job_id: str, on_progress: ProgressCallback | None = None,
             poll_interval: float = 1.0, timeout: float | None = None) -> Op[TrainingJob]:
    """Poll until the job is succeeded/failed/cancelled; `on_progress` sees every change."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last: tuple[Any, ...] | None = None
    while True:
        job = yield from get_job(policy, job_id)
        key = (job.status, job.step, job.steps, len(job.loss_history), job.loss)
        if on_progress is not None and key != last:
            yield from maybe_await(on_progress(job))
        last = key
        if job.done:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeoutError(f"job {job_id} still {job.status} after {timeout}s")
        yield Sleep(poll_interval)

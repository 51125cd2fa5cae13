"""loraplex Python client: a typed SDK (sync `Client`, asyncio `AsyncClient`) and the CLI.

Depends only on httpx and the standard library, so it installs and runs
without the server's stack (torch, transformers).

    from client import Client
    with Client("http://127.0.0.1:8000") as c:
        print(c.generate("Hello", adapter_id="pirate", max_new_tokens=32).text)
        for delta in c.generate_stream("Hello"):
            print(delta, end="", flush=True)
"""

from __future__ import annotations

from client.async_client import AsyncClient
from client.config import VERSION as __version__
from client.errors import (
    ApiError,
    AuthError,
    ConflictError,
    ConnectionFailedError,
    InvalidInputError,
    LoraplexError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    UnavailableError,
    ValidationError,
    WaitTimeoutError,
)
from client.models import Adapter, Choice, Generation, ModelInfo, TokenLogprob, TrainingJob, Usage
from client.retry import RetryPolicy
from client.streaming import AsyncGenerateStream, GenerateStream
from client.sync_client import Client

__all__ = [
    "Adapter", "ApiError", "AsyncClient", "AsyncGenerateStream", "AuthError", "Choice", "Client", "ConflictError",
    "ConnectionFailedError", "GenerateStream", "Generation", "InvalidInputError", "LoraplexError", "ModelInfo",
    "NotFoundError", "PayloadTooLargeError", "RateLimitError", "RetryPolicy", "ServerError", "TokenLogprob", "TrainingJob",
    "UnavailableError", "Usage", "ValidationError", "WaitTimeoutError", "__version__",
]

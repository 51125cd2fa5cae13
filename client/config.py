"""Where the server is and who we are: arguments first, then the environment.

`LORAPLEX_URL` and `LORAPLEX_API_KEY` let the same script or CLI invocation run
against a laptop and a GPU node unchanged.
"""

from __future__ import annotations

import os

import httpx

VERSION = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "LORAPLEX_URL"
API_KEY_ENV = "LORAPLEX_API_KEY"
# Generation can legitimately take minutes; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def resolve_url(base_url: str | None) -> str:
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get(API_KEY_ENV) or None


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"loraplex-client/{VERSION}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def as_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))

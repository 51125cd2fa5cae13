"""One ordinary tenant's worst inputs, replayed against a server until a deadline, in a process of its own.

Why a process: the soak measures what hostile inputs cost the *server*. Replayed
from threads of the process that also times the benign requests, they took the
benign client's GIL (each `httpx.post` builds a client and loads the CA bundle,
~20 ms of CPU under the GIL) and the measurement showed the client's contention,
not the server's. Each hostile request still opens a fresh connection, as before.

    python -m tests.hardening.hostile_replay URL SECONDS
    -> "replaying" once its threads start, then after SECONDS one JSON line: {"statuses": {...}, "bad": [...]}
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter

import httpx

from tests.api.raw_http import connect, read_response

PAUSE_S = 0.25  # per hostile thread: a replay of costly inputs, not a request flood (that is rate limiting)
# 3 MB, encoded once: the client's own CPU is not what is measured
HUGE = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 600_000}]}).encode()


class Hostile:
    """Every answer must be a 4xx; anything else (or a dropped connection) is collected in `bad`."""

    def __init__(self, url: str, deadline: float) -> None:
        self.url, self.deadline = url, deadline
        self.statuses: Counter[int] = Counter()
        self.bad: list[str] = []
        self._lock = threading.Lock()

    def steps(self) -> list:
        return [self.huge_prompt, self.long_prompt, self.long_boundary, self.oversized_declared, self.malformed]

    def loop(self, step) -> None:
        # no keep-alive: every request opens its own connection, as a fresh attacker's would
        with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while time.monotonic() < self.deadline:
                try:
                    status = step(client)
                except Exception as exc:  # noqa: BLE001 - collected and asserted on by the test
                    self._note(None, f"{step.__name__}: {exc!r}")
                    time.sleep(0.2)
                    continue
                self._note(status, None if 400 <= status < 500 else f"{step.__name__} -> {status}")
                time.sleep(PAUSE_S)

    def _note(self, status: int | None, bad: str | None) -> None:
        with self._lock:
            if status is not None:
                self.statuses[status] += 1
            if bad is not None:
                self.bad.append(bad)

    def huge_prompt(self, client: httpx.Client) -> int:
        return client.post(f"{self.url}/v1/chat/completions", content=HUGE,
                           headers={"Content-Type": "application/json"}).status_code

    def long_prompt(self, client: httpx.Client) -> int:
        return client.post(f"{self.url}/generate", json={"prompt": "hello " * 1500, "max_new_tokens": 4}).status_code

    def long_boundary(self, client: httpx.Client) -> int:
        boundary = "b" * 5000
        return client.put(f"{self.url}/v1/adapters/hostile", content=b"--" + boundary.encode() + b"--\r\n",
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}).status_code

    def oversized_declared(self, client: httpx.Client) -> int:
        with connect(self.url) as sock:
            sock.sendall(b"PUT /v1/adapters/hostile HTTP/1.1\r\nHost: t\r\nContent-Length: 900000000\r\n"
                         b"Content-Type: multipart/form-data; boundary=x\r\nExpect: 100-continue\r\n\r\n")
            return read_response(sock)[0]

    def malformed(self, client: httpx.Client) -> int:
        with connect(self.url) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 1x\r\n\r\n")
            return read_response(sock)[0]


def replay(url: str, seconds: float) -> Hostile:
    """All hostile steps at once, one thread each, until `seconds` from now."""
    hostile = Hostile(url, time.monotonic() + seconds)
    threads = [threading.Thread(target=hostile.loop, args=(step,), daemon=True) for step in hostile.steps()]
    for t in threads:
        t.start()
    print("replaying", flush=True)  # the test's benign window starts only now: imports are not hostile load
    for t in threads:
        t.join(seconds + 120)
    return hostile


if __name__ == "__main__":
    done = replay(sys.argv[1], float(sys.argv[2]))
    print(json.dumps({"statuses": {str(k): v for k, v in done.statuses.items()}, "bad": done.bad[:20]}))

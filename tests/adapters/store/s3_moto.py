"""A real S3-compatible server for the store's tests: moto's server mode on loopback, in this process.

Its buckets live in moto's in-process backend, so a server stopped and started
again on the same port finds them as they were (an outage, then recovery).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from server.adapters.store.object_store import S3Location, S3Options
from tests.harness import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3:
    """One moto server on 127.0.0.1 that a test may stop (the store becomes unreachable) and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, prefix: str = "adapters") -> S3Options:
        """A fresh bucket (tests never see each other's objects) and the options a store opens it with."""
        name = f"lpx-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return S3Options(S3Location(name, prefix), endpoint_url=self.endpoint, region="us-east-1",
                         timeout_s=2.0, max_attempts=2)


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        server = MotoS3()
        server.start()
        try:
            yield server
        finally:
            server.stop()

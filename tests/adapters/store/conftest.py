"""The S3 backend's tests share one moto server on loopback per module (each test gets its own bucket)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adapters.store.s3_moto import MotoS3, moto_s3


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server

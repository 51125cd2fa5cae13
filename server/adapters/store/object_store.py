"""A small, bounded view of one S3-compatible bucket (boto3): get, conditional put, list, delete.

Why a wrapper: every call must end in bounded time (connect/read timeouts and a
fixed number of attempts), and every way the bucket can fail (refused
connection, timeout, missing credentials, 5xx, access denied) must reach a
client as one clean `StoreUnavailable` (503) instead of a botocore exception.
Credentials come from boto3's standard chain (environment, config files,
instance role) and are never logged; the bucket and prefix are logged, never
shown to clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from server.errors import StoreUnavailable

log = logging.getLogger(__name__)

S3_URL_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?$")
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
LOST_RACE_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
CHUNK = 1 << 20


class PreconditionFailed(Exception):
    """A conditional write lost its race (the object changed, or already exists)."""


class _Missing(Exception):
    """The object does not exist (a 404): each caller turns it into its own answer."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" = the bucket's root); keys under it are `prefix/<parts>`."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> "S3Location":
        m = S3_URL_RE.fullmatch(url.strip())
        if m is None:
            raise ValueError(f"not an S3 location: {url!r} (expected s3://bucket or s3://bucket/prefix)")
        prefix = (m.group("prefix") or "").strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError(f"S3 prefix {prefix!r} has an empty, '.' or '..' segment")
        return cls(m.group("bucket"), prefix)

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class S3Options:
    """Where the bucket is and how long one call may take: at most `max_attempts` × `timeout_s` per
    connection phase (plus boto3's short backoff between attempts)."""

    location: S3Location
    endpoint_url: str | None = None
    region: str | None = None
    timeout_s: float = 5.0
    max_attempts: int = 2


def make_client(options: S3Options) -> Any:
    """An S3 client with bounded timeouts and retries; path-style addressing for custom endpoints
    (MinIO, moto, Ceph answer on one host name, not one per bucket)."""
    config = Config(connect_timeout=options.timeout_s, read_timeout=options.timeout_s,
                    retries={"total_max_attempts": options.max_attempts, "mode": "standard"},
                    max_pool_connections=16,
                    s3={"addressing_style": "path"} if options.endpoint_url else None)
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config)


class ObjectStore:
    def __init__(self, options: S3Options) -> None:
        self.options = options
        self.location = options.location
        self.bucket = options.location.bucket
        self._client = make_client(options)

    @contextlib.contextmanager
    def _calls(self, what: str, missing_ok: bool = False) -> Iterator[None]:
        """Every failure becomes StoreUnavailable (logged here, with the cause), but a lost race
        (PreconditionFailed) and, where the caller asks, a missing object (_Missing)."""
        try:
            yield
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in MISSING_CODES and missing_ok:
                raise _Missing(what) from None
            if code in LOST_RACE_CODES:
                raise PreconditionFailed(what) from None
            log.warning("adapter store %s: %s failed: %s", self.location, what, code or e)
            raise StoreUnavailable() from None
        except BotoCoreError as e:
            log.warning("adapter store %s unreachable (%s): %s", self.location, what, type(e).__name__)
            raise StoreUnavailable() from None

    def check(self) -> None:
        """The bucket answers (start-up): otherwise StoreUnavailable for the operator, naming the bucket."""
        try:
            with self._calls("head bucket"):
                self._client.head_bucket(Bucket=self.bucket)
        except StoreUnavailable:
            raise StoreUnavailable(f"the adapter store {self.location} cannot be used: the endpoint did not answer, "
                                   "the bucket does not exist, or it refused these credentials (the log says "
                                   "which)") from None

    # -- objects -------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag; None when it does not exist."""
        try:
            with self._calls(f"get {key}", missing_ok=True):
                resp = self._client.get_object(Bucket=self.bucket, Key=key)
                return resp["Body"].read(), resp["ETag"]
        except _Missing:
            return None

    def exists(self, key: str) -> bool:
        try:
            with self._calls(f"head {key}", missing_ok=True):
                self._client.head_object(Bucket=self.bucket, Key=key)
                return True
        except _Missing:
            return False

    def put(self, key: str, body: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
        """Write one object (PreconditionFailed when the condition fails: an If-Match object that is
        gone lost its race too); returns its ETag."""
        extra: dict[str, str] = {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        if if_absent:
            extra["IfNoneMatch"] = "*"
        try:
            with self._calls(f"put {key}", missing_ok=True):
                return str(self._client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)["ETag"])
        except _Missing:
            raise PreconditionFailed(key) from None

    def put_file(self, key: str, path: Path) -> None:
        """One PUT of a local file (S3 takes up to 5 GB in one; adapters are capped far below)."""
        with self._calls(f"put {key}"), open(path, "rb") as f:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=f)

    def download(self, key: str, dest: Path) -> tuple[str, int] | None:
        """Stream an object to `dest`; its sha256 hex and size, or None when it does not exist."""
        h = hashlib.sha256()
        size = 0
        try:
            with self._calls(f"get {key}", missing_ok=True), open(dest, "wb") as f:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
                for chunk in body.iter_chunks(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
        except _Missing:
            return None
        return h.hexdigest(), size

    def delete(self, keys: list[str]) -> None:
        """Remove objects (missing ones are fine), in batches of S3's 1000."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._calls("delete objects"):
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # -- listing ---------------------------------------------------------------
    def children(self, prefix: str) -> list[str]:
        """Names one level below `prefix/` (S3's common prefixes: the "directories")."""
        base = prefix.rstrip("/") + "/" if prefix else ""
        names = []
        with self._calls(f"list {base}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                          Delimiter="/")
            for page in pages:
                names += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix/`."""
        base = prefix.rstrip("/") + "/"
        found = []
        with self._calls(f"list {base}"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                found += [obj["Key"] for obj in page.get("Contents", [])]
        return found

"""Durable file operations for the adapter store: digest, fsync, atomic JSON writes.

Why fsync at all: a rename is atomic, but without flushing the renamed
directory's files (and the parent directory entry) a power cut can publish a
version whose bytes never reached the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 hex and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A fresh dir under `parent` (same filesystem as its destination: installing it is one rename);
    gone on exit unless the caller moved it away."""
    path = parent / uuid.uuid4().hex
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

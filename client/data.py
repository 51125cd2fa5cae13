"""Training data: inline examples, or the path of a JSONL file sent as is.

A file is uploaded as the file itself (`/v1/training/jobs/upload`), so large
datasets need not fit a JSON body and the server's line-numbered validation
messages refer to the user's own file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from client.errors import InvalidInputError

TrainingData = list[dict[str, Any]] | str | os.PathLike[str]


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {p}: {exc.strerror or exc}") from exc

"""The pointer object: the one mutable object per adapter in a shared bucket, and its commit point.

    <prefix>/<tenant>/<adapter_id>/pointer.json      {"format": 1, "version": 3, "deleted_through": 1,
                                                      "files": {name: {"sha256", "size"}}, "record": {...}}
    <prefix>/<tenant>/<adapter_id>/v000003/<file>    immutable: written once, before the pointer names it

Why this shape: a version's objects are written first and the pointer last, by
a compare-and-swap PUT (If-Match on the pointer's ETag), so a reader sees
either the old version or the new one, whole; the pointer carries every
file's SHA-256, so a reader verifies exactly the bytes the publisher wrote and
can never assemble one version's config with another's weights. A delete is a
pointer with `version: null` (a tombstone), which keeps version numbers
growing across deletes: an `AdapterKey` names one set of weights forever.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

POINTER_NAME = "pointer.json"
FORMAT = 1


class PointerCorrupt(ValueError):
    """The pointer object is not one this server wrote (hand-edited, truncated, a newer format)."""


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


@dataclass(frozen=True)
class Pointer:
    version: int | None  # None: deleted (a tombstone), or never published
    deleted_through: int = 0
    files: dict[str, FileDigest] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.version is not None

    @property
    def newest_number(self) -> int:
        """The highest version number ever used: the next publish takes one above it."""
        return max(self.version or 0, self.deleted_through)

    @property
    def digest(self) -> str:
        """One short name for this version's bytes (its local cache directory carries it)."""
        return "-".join(self.files[name].sha256[:12] for name in sorted(self.files))[:40]

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "version": self.version, "deleted_through": self.deleted_through,
                           "files": {n: {"sha256": d.sha256, "size": d.size} for n, d in self.files.items()},
                           "record": self.record}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Pointer":
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise PointerCorrupt(f"pointer format {raw.get('format')!r} is not {FORMAT}")
            version = raw["version"]
            files = {str(n): FileDigest(str(d["sha256"]), int(d["size"])) for n, d in raw["files"].items()}
            pointer = cls(None if version is None else int(version), int(raw["deleted_through"]), files,
                          dict(raw["record"]))
        except PointerCorrupt:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PointerCorrupt(f"pointer object unreadable: {type(e).__name__}") from None
        if pointer.live and not files:
            raise PointerCorrupt("a live pointer lists no files")
        return pointer


NONE = Pointer(version=None)  # what a never-published adapter reads as

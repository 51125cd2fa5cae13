"""Two log lines torchao's import writes that this server does not need, filtered wherever it is imported.

torchao's CUDA-only extensions (mxfp8 for Blackwell, CUTLASS for sm90a) fail to load on a CPU build of
torch ("Failed to load …_C_….so"), and torch warns that torchao registers its Enums as pytree constants
("… is an Enum subclass …"). Neither touches the int8/int4 weight-only paths. transformers imports torchao
as it loads any model once torchao is installed, so the filters go on at package import (server/__init__),
before any import order can matter; standard library only, so that costs nothing.
"""

from __future__ import annotations

import logging

KNOWN_NOISE = (("torchao", "Failed to load "), ("torch.utils._pytree", "is an Enum subclass"))


class _DropKnownNoise(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_torchao_noise() -> None:
    """Idempotent: one filter per logger, kept (torchao registers more Enums as it imports lazily)."""
    for name, fragment in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(fragment))

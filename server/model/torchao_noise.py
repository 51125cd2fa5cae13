"""Log lines torchao's (and bitsandbytes') import writes that this server does not need, filtered wherever
they are imported.

Two of torchao's prebuilt extensions fail to load here ("Failed to load …/_C_mxfp8….so", built for
CPython 3.10; "…/_C_cutlass_90a….so", CUDA sm90a only). They serve the mxfp8 and fp8 CUTLASS paths, never
the int8/int4 weight-only ones, so only those two files' failures are dropped: any other still shows.
torch also warns that torchao registers its Enums as pytree constants ("… is an Enum subclass …"), a
deprecation for torchao to act on. bitsandbytes, on an AVX512-BF16 CPU, reports that the optional `kernels`
package is absent ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'");
that kernel serves only its bfloat16 repacked CPU layout, which quantize.py turns off on every layer, so
exactly that line is dropped. transformers imports torchao as it loads any model once torchao is
installed (and PEFT imports bitsandbytes), so the filters go on at package import (server/__init__),
whatever the import order; standard library only, so that costs nothing.
"""

from __future__ import annotations

import logging
import re

KNOWN_NOISE = (("torchao", re.compile(r"^Failed to load \S*/_C_(mxfp8|cutlass_90a)[^/]*\.so")),
               ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported")),
               ("bitsandbytes.backends.cpu.ops", re.compile(r"^Failed to load CPU gemm_4bit_forward from "
                                                            r"kernels-community: No module named 'kernels'\.")))


class _DropKnownNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def silence_torchao_noise() -> None:
    """Idempotent: one filter per logger, kept (torchao registers more Enums as it imports lazily)."""
    for name, pattern in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(pattern))

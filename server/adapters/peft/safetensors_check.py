"""Structural check of a safetensors file before any tensor is materialized.

Uploaded files are hostile until proven otherwise: the `safetensors` library is
safe against code execution, but a forged header can still ask for a huge
allocation or point tensors at overlapping bytes. So the header is parsed here
with hard bounds first, and every tensor's byte range is checked against its
declared dtype and shape; only then does the real loader touch the file.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from server import json_input
from server.errors import AdapterError

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000
# The format nests 3 deep ({name: {"shape": [...]}}); json would recurse until RecursionError.
MAX_HEADER_DEPTH = 3

# The floating dtypes an adapter may carry (safetensors dtype name -> torch dtype).
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# Every dtype the safetensors format declares, with its bytes per element (accepted by the
# parser, refused later if not float).
KNOWN_DTYPES = {
    **{name: dtype.itemsize for name, dtype in FLOAT_DTYPES.items()},
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # of its first byte in the file (header included)


def check_safetensors(path: Path, max_bytes: int) -> dict[str, TensorInfo]:
    """Validate the file's layout; return its tensors' declared dtype/shape by name."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"adapter weights are {size} bytes, over the limit of {max_bytes} bytes")
    if size < 8:
        raise AdapterError("adapter_model.safetensors is truncated (no header length)")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise AdapterError(f"adapter_model.safetensors has an invalid header length {header_len}")
        raw = f.read(header_len)
    header = _parse_header(raw)
    infos, ranges = _collect_tensors(header, data_start=8 + header_len)
    _check_ranges(ranges, data_len=size - 8 - header_len)
    return infos


def _parse_header(raw: bytes) -> dict:
    try:
        header = json_input.loads(raw.decode("utf-8"), MAX_HEADER_DEPTH)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"adapter_model.safetensors has a corrupt header: {e}") from None
    if not isinstance(header, dict):
        raise AdapterError("adapter_model.safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError("adapter_model.safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise AdapterError("adapter_model.safetensors declares too many tensors")
    return header


def _collect_tensors(header: dict, data_start: int) -> tuple[dict[str, TensorInfo], list[tuple[int, int, str]]]:
    infos: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, begin, end = _tensor_entry(name, entry, data_start)
        infos[name] = info
        ranges.append((begin, end, name))
    return infos, ranges


def _tensor_entry(name: str, entry: object, data_start: int) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise AdapterError(f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in KNOWN_DTYPES:  # a list or object is unhashable
        raise AdapterError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_nat(d) for d in shape):
        raise AdapterError(f"tensor {name!r}: invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_nat(o) for o in offsets):
        raise AdapterError(f"tensor {name!r}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * KNOWN_DTYPES[dtype]
    if end < begin or end - begin != nbytes:
        raise AdapterError(
            f"tensor {name!r}: data_offsets {offsets} do not match {dtype} shape {shape} ({nbytes} bytes)"
        )
    return TensorInfo(name, dtype, tuple(shape), nbytes, data_start + begin), begin, end


def _check_ranges(ranges: list[tuple[int, int, str]], data_len: int) -> None:
    """Byte ranges must tile the data area exactly: in range, no overlap, no hidden bytes."""
    cursor = 0
    for begin, end, name in sorted(ranges):
        if begin != cursor:
            reason = "overlaps another tensor" if begin < cursor else "leaves a gap before it"
            raise AdapterError(f"tensor {name!r}: data range {reason}")
        cursor = end
    if cursor != data_len:
        raise AdapterError(
            f"adapter_model.safetensors size is inconsistent: header covers {cursor} data bytes, file has {data_len}"
        )


def _is_nat(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53

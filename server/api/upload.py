"""Streaming receipt of an adapter upload (multipart `config` + `weights`) into a staging dir.

Why not `request.form()`: Starlette spools file parts to /tmp with no size
limit per part. Here each part is written straight into the store's own
staging dir (same filesystem, so publishing is one rename) while its bytes are
counted, and the upload is cut with 413 the moment the weights pass
`max_adapter_bytes`: nothing is ever buffered whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from server.adapters.peft.peft_config import MAX_CONFIG_BYTES
from server.adapters.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME
from server.api.limits import DISCARD_MAX  # also after refusing an upload mid-stream
from server.errors import AdapterError, ApiError, InsufficientStorage, InvalidRequest, PayloadTooLarge, is_out_of_space

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PART_FILES = {"config": CONFIG_NAME, "weights": WEIGHTS_NAME}


@dataclass
class _Part:
    name: str
    filename: str | None
    out: IO[bytes]
    size: int = 0
    head: bytes = b""


@dataclass
class _Receiver:
    """The parser's callbacks: route each part's bytes into its file, enforcing limits."""

    dest: Path
    max_weights: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field_name: bytes = b""
    field_value: bytes = b""
    part: _Part | None = None
    seen: set[str] = field(default_factory=set)

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.field_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field_name.lower()] = self.field_value
        self.field_name, self.field_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        if name not in PART_FILES:
            raise InvalidRequest(f"unexpected multipart part {name!r}: send 'config' and 'weights'")
        if name in self.seen:
            raise InvalidRequest(f"multipart part {name!r} was sent twice")
        if name == "weights" and filename and filename.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterError(f"pickled weights ({filename!r}) are refused: upload {WEIGHTS_NAME} "
                               "(PEFT save_pretrained with safe_serialization=True)")
        self.seen.add(name)
        self.part = _Part(name, filename, open(self.dest / PART_FILES[name], "wb"))  # noqa: SIM115

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        assert part is not None
        chunk = data[start:end]
        part.size += len(chunk)
        limit = self.max_weights if part.name == "weights" else MAX_CONFIG_BYTES
        if part.size > limit:
            what = "adapter weights" if part.name == "weights" else "adapter config"
            raise PayloadTooLarge(f"{what} exceed the limit of {limit} bytes")
        if len(part.head) < 16:
            part.head += chunk[: 16 - len(part.head)]
        part.out.write(chunk)

    def on_part_end(self) -> None:
        part, self.part = self.part, None
        if part is None:
            return
        part.out.close()
        if part.name == "weights":
            check_not_pickle(part.head)

    def close(self) -> None:
        if self.part is not None:
            with contextlib.suppress(OSError):  # flushing after ENOSPC fails again; the staging dir is dropped
                self.part.out.close()


def check_not_pickle(head: bytes) -> None:
    """Refuse torch.save / pickle content whatever the file is called."""
    if head.startswith(b"PK\x03\x04"):
        raise AdapterError("weights are a zip archive (a torch.save checkpoint), not safetensors: "
                           "pickled weights are refused")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise AdapterError("weights are a pickle, not safetensors: pickled weights are refused")


def multipart_boundary(request: Request) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest("an adapter upload must be multipart/form-data with parts 'config' "
                             f"({CONFIG_NAME}) and 'weights' ({WEIGHTS_NAME})")
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise InvalidRequest(f"the multipart boundary is {len(boundary)} bytes; at most {MAX_BOUNDARY_LENGTH} "
                             "are accepted (RFC 2046 allows 70)")
    return boundary


class BodyReader:
    """The request body chunk by chunk, remembering whether it has all been read."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.done = False

    async def next_chunk(self) -> bytes:
        message = await self.request.receive()
        if message["type"] == "http.disconnect":
            self.done = True
            raise ClientDisconnect()
        self.done = not message.get("more_body", False)
        return message.get("body", b"")

    async def discard(self, budget: int = DISCARD_MAX) -> None:
        """Drop what is left of a refused body (bounded), so the client reads our answer."""
        seen = 0
        with contextlib.suppress(ClientDisconnect, OSError, ApiError, HTTPException):  # e.g. a 408: stop
            while not self.done and seen <= budget:
                seen += len(await self.next_chunk())


async def receive_upload(request: Request, boundary: bytes, dest: Path, max_weights_bytes: int) -> None:
    """Write the two parts to dest/adapter_config.json and dest/adapter_model.safetensors.

    `boundary`: from `multipart_boundary`, checked by the caller before it made `dest`.
    """
    body = BodyReader(request)
    receiver = _Receiver(dest, max_weights_bytes)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())
        while not body.done:
            parser.write(await body.next_chunk())
        parser.finalize()
    except FormParserError as e:  # every parser refusal (framing, header sizes, counts) is the client's
        await body.discard()
        raise InvalidRequest(f"malformed multipart body: {e}") from None
    except ClientDisconnect:
        raise InvalidRequest("the client disconnected during the upload") from None
    except ApiError:
        await body.discard()
        raise
    except OSError as e:
        if not is_out_of_space(e):
            raise
        await body.discard()  # the client reads the 507 instead of a reset
        raise InsufficientStorage() from None
    finally:
        receiver.close()
    for name, filename in PART_FILES.items():
        if name not in receiver.seen:
            raise InvalidRequest(f"missing multipart part {name!r} ({filename})")
    check_config(dest / CONFIG_NAME)


@contextlib.asynccontextmanager
async def client_left(request: Request) -> AsyncIterator[threading.Event]:
    """An event set once the client disconnects (after its body was read): work for it can stop.

    A threading.Event, because the work it stops (validation, publishing) runs on worker threads.
    """
    gone = threading.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        watcher.cancel()


def check_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"config ({CONFIG_NAME}) is not valid JSON: {e}") from None
    except RecursionError:  # the depth bound itself is the config parser's (parse_config)
        raise AdapterError(f"config ({CONFIG_NAME}) is nested too deeply") from None
    if not isinstance(config, dict):
        raise AdapterError(f"config ({CONFIG_NAME}) must be a JSON object")
    return config

"""Raw HTTP/1.1 over one socket: what httpx would normalise or hide (keep-alive reuse, bad framing, trickles)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit


def connect(base_url: str, timeout: float = 30.0) -> socket.socket:
    parts = urlsplit(base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, lower-cased headers, body by Content-Length); skips 1xx interim responses."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a full response head: {buf[:200]!r}")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status >= 200:
            break
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return status, headers, buf[:length]


def json_body(body: bytes) -> dict:
    return json.loads(body.decode())


def closed_by_peer(sock: socket.socket, wait_s: float = 5.0) -> bool:
    """True once the server has closed its side (recv returns EOF or resets) within wait_s."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def trickle(sock: socket.socket, data: bytes, interval_s: float, until: float) -> bool:
    """Send `data` one byte per interval until the server closes or `until` (monotonic); True if it closed."""
    for byte in data:
        if time.monotonic() >= until:
            return False
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return True
        time.sleep(interval_s)
    return False

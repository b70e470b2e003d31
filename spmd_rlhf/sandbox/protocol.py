"""Length-prefixed JSON messages between the pool and its workers (over pipes)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_HEADER = struct.Struct("<I")


def encode(message: dict[str, Any]) -> bytes:
    """One message as bytes (TypeError/ValueError for what JSON cannot carry)."""
    data = json.dumps(message).encode()
    return _HEADER.pack(len(data)) + data


def write_all(fd: int, payload: bytes) -> None:
    """Write ``payload`` (blocking)."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def send(fd: int, message: dict[str, Any]) -> None:
    """Write one message (blocking)."""
    write_all(fd, encode(message))


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd: int) -> dict[str, Any] | None:
    """Read one message (blocking); None at end of file (the other side is gone)."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)

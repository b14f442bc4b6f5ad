"""Unix sockets for root's use only: bound with mode 0600 at a path the kernel takes, and
asked one JSON line for one JSON line (the image views' control socket)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from layerfs.errors import LayerfsError

MAX_PATH_BYTES = 107  # sun_path holds 108 bytes, the last one a NUL
MAX_LINE = 1 << 20  # bytes of a request or answer line, at most


class SocketPathTooLong(LayerfsError):
    """A unix socket's path is longer than the kernel allows."""


def bind_private(path: Path) -> socket.socket:
    """A unix stream socket bound at ``path`` (which must not exist), mode 0600 from the
    start (no moment at which others may connect); not listening yet."""
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise SocketPathTooLong(
            f"socket path {path} is longer than a unix socket's {MAX_PATH_BYTES} bytes"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def ask_line(path: Path, request: dict, timeout: float) -> dict | None:
    """Send ``request`` as one JSON line to the server at ``path`` and return its answer
    line, parsed; None if nobody listens there. OSError if the exchange fails, ValueError
    if the answer is no JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) <= MAX_LINE:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ValueError(f"the answer is no JSON object: {data[:200]!r}")
    return answer

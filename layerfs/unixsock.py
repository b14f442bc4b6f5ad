"""Listening unix sockets for root's use only: bound with mode 0600 at a path the kernel takes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from layerfs.errors import LayerfsError

MAX_PATH_BYTES = 107  # sun_path holds 108 bytes, the last one a NUL


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

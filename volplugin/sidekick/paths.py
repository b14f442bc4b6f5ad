"""Where a volume's scoped (sidekick) socket lives, for any volume name.

A unix socket's path must be shorter than 108 bytes, and a volume name may be 255.
`DIR/NAME.sock` is used when it fits; otherwise `DIR/_HASH.sock`, HASH being the first
32 hex digits of the SHA-256 of the name. A volume name starts with a letter or digit,
so a file name starting with `_` is never some other volume's: the two forms cannot
collide. `volplugin inspect` and `docker volume inspect` show the path (`SidekickSocket`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from volplugin.errors import StateError
from volplugin.volumes.names import check_name

SIDEKICK_DIR = Path("/run/volplugin/volumes")
OPTION = "sidekick-socket"  # the volume option asking for a scoped socket
MAX_SOCKET_PATH = 107  # bytes; sun_path holds 108 with the terminating NUL


def wants_socket(options: dict[str, str]) -> bool:
    return options.get(OPTION) == "true"


def socket_path(directory: Path, name: str) -> Path:
    """The scoped socket of volume `name` under `directory` (see the module's docstring)."""
    plain = Path(directory) / f"{check_name(name)}.sock"
    if len(os.fsencode(plain)) <= MAX_SOCKET_PATH:
        return plain
    hashed = Path(directory) / f"_{hashlib.sha256(name.encode()).hexdigest()[:32]}.sock"
    if len(os.fsencode(hashed)) > MAX_SOCKET_PATH:
        raise StateError(
            f"the sidekick socket directory {directory} is too long for unix sockets "
            f"({len(os.fsencode(hashed))} bytes with a socket name): use a shorter --sidekick-dir"
        )
    return hashed


def check_directory(directory: Path) -> None:
    """Fail at start if even a hashed socket name does not fit under `directory`."""
    socket_path(directory, "x" * 255)

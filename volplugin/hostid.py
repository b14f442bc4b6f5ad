"""The host identity that backups record and that retention groups them by.

`volplugin serve --host-id ID` and `volplugin --host-id ID` (or VOLPLUGIN_HOST_ID) set it;
the default is the machine's hostname. Hosts sharing a store need distinct ids: a
retention policy on one host only forgets that host's backups (unless told otherwise).
The id is kept in the environment, so the processes `serve` starts inherit it.
"""

from __future__ import annotations

import os
import re

from volplugin.errors import BadRequest

ENV = "VOLPLUGIN_HOST_ID"
MAX_HOST_ID = 253
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")


def check_host_id(value: str) -> str:
    """`value` if it is a usable host id, else BadRequest saying what one looks like."""
    if not value or len(value) > MAX_HOST_ID or not _HOST_ID.fullmatch(value):
        raise BadRequest(
            f"host id {value!r} is not allowed: give 1 to {MAX_HOST_ID} letters, digits, "
            "'_', '.', ':', '@' or '-', starting with a letter or digit"
        )
    return value


def host_id() -> str:
    """The configured host id, else the machine's hostname."""
    import socket

    return os.environ.get(ENV) or socket.gethostname()


def use_host_id(value: str | None) -> None:
    """Make `value` this process's (and its children's) host id; None keeps the current one."""
    if value is not None:
        os.environ[ENV] = check_host_id(value)

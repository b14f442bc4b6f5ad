"""Who may change a root: one `volplugin serve`, or direct commands (`--root DIR`) while none runs.

`volplugin serve` holds an exclusive flock on ROOT/serve.lock for its life
(`serving_root`). A direct command that changes the root takes a shared lock on the same
file while it runs (`unserved_root`): it is refused, in one line, while a server holds
the root, and no server starts meanwhile. Commands that only read need no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from volplugin.errors import StateError

LOCK_NAME = "serve.lock"


class RootServed(StateError):
    """A `volplugin serve` holds the root a direct command would change."""


@contextlib.contextmanager
def serving_root(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ROOT/serve.lock (made with the root if missing) while
    a server uses the root; StateError if a server or a direct command holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"the root {root} is in use by another `volplugin serve` or by a direct "
                "command (`volplugin --root ...` backup, restore or prune): stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def unserved_root(root: Path, command: str) -> Iterator[None]:
    """Hold a shared lock on ROOT/serve.lock while `command` changes `root` directly.

    RootServed if a server holds the root. A root that does not exist yet has no server:
    the command itself says what is wrong with it.
    """
    root = Path(root)
    try:
        dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            yield
            return
        raise StateError(f"cannot open the root {root}: {exc.strerror}") from None
    try:
        try:
            fd = os.open(
                LOCK_NAME,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dirfd,
            )
        except OSError as exc:
            raise StateError(f"cannot open {root / LOCK_NAME}: {exc.strerror}") from None
    finally:
        os.close(dirfd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootServed(
                f"a `volplugin serve` is running on the root {root}: drop --root (and "
                f"--store) so that `{_through(root)} {command}` goes through the plugin's socket"
            ) from None
        yield
    finally:
        os.close(fd)


def _through(root: Path) -> str:
    """`volplugin`, with --name when the server recorded a name other than the default."""
    from volplugin.defaults import DEFAULT_NAME
    from volplugin.pluginrecord import read_record

    try:
        record = read_record(root)
    except StateError:
        record = None
    if record is None or record.name == DEFAULT_NAME:
        return "volplugin"
    return f"volplugin --name {record.name}"

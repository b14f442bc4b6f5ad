"""Run a FUSE mount's server in the foreground or as a daemon; list the kernel's mounts
and set a mount's read-ahead.

``mount_daemon`` takes a serving function rather than a filesystem object so that
everything the filesystem opens (database connections, threads) is created in
the process that serves the mount, after any fork. The daemon is a fork of the
caller, so it imports nothing again. In the background the caller returns as
soon as the daemon reports through a pipe that its mount exists; the daemon
writes its log (and libfuse's messages) to the log file it is given.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import LayerfsError

LOG_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
_READY = b"ready\n"


class MountError(LayerfsError):
    """A mount could not be made or removed."""


@dataclass(frozen=True)
class KernelMount:
    """The fields of one /proc/self/mountinfo line that matter here."""

    mountpoint: str
    fstype: str
    source: str
    options: str = ""  # the filesystem's own options (e.g. overlay's lowerdir=...)
    device: str = ""  # its st_dev as "major:minor"


def _unescape(field: str) -> str:
    out = field
    for code in ("\\040", "\\011", "\\012", "\\134"):
        out = out.replace(code, chr(int(code[1:], 8)))
    return out


def kernel_mounts() -> list[KernelMount]:
    """Every mount this process sees, in /proc/self/mountinfo order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source, *rest = right.split()
            options = rest[0] if rest else ""
            mountpoint, device = _unescape(fields[4]), fields[2]
            out.append(KernelMount(mountpoint, fstype, _unescape(source), options, device))
    return out


def find_mount(mountpoint: str | Path, *, resolve: bool = True) -> KernelMount | None:
    """The topmost mount at ``mountpoint``, or None. ``resolve``: follow symlinks in the
    path first; without it the path is taken as it is and nothing at it is touched (a
    FUSE server may look up its own mount before it answers)."""
    target = os.path.realpath(mountpoint) if resolve else os.path.abspath(mountpoint)
    found = None
    for mount in kernel_mounts():
        if mount.mountpoint == target:
            found = mount
    return found


def set_read_ahead(mountpoint: str | Path, kib: int) -> bool:
    """Set the kernel's read-ahead window for the filesystem mounted at ``mountpoint``
    (its backing device's ``read_ahead_kb`` in /sys/class/bdi), found in the mount
    table without touching the mount (``mountpoint`` as it is, no symlink in it).
    False if that cannot be done (no such mount, no sysfs, not root)."""
    mount = find_mount(mountpoint, resolve=False)
    if mount is None or not mount.device:
        return False
    try:
        Path(f"/sys/class/bdi/{mount.device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError:
        return False
    return True


def _setup_daemon_logging(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)


def mount_daemon(
    serve: Callable[[Callable[[], None] | None], None],
    mountpoint: str | Path,
    *,
    fstype: str,
    label: str,
    foreground: bool,
    log_file: Path,
    timeout: float = 60.0,
    on_unmount: Callable[[], None] | None = None,
) -> int:
    """Run ``serve`` (which mounts at ``mountpoint`` and answers until unmounted).

    ``serve`` is given a function to call once the mount exists (None in the
    foreground). In the foreground this serves until unmounted. Otherwise it
    forks a daemon in its own session and returns its pid once the mount is
    listed as ``fstype``; if the daemon dies first, MountError points at
    ``log_file``. ``on_unmount`` runs in the serving process once the mount is
    gone (e.g. to drop its record).
    """
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory: create it first")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point: unmount it first")
    if foreground:
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
        serve(None)
        if on_unmount is not None:
            on_unmount()
        return os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate child: new session, then the daemon
        os.close(read_end)
        os.setsid()
        daemon = os.fork()
        if daemon != 0:
            os.write(write_end, f"{daemon}\n".encode())
            os._exit(0)
        status = 1
        try:
            os.chdir("/")
            _setup_daemon_logging(log_file)
            logging.getLogger(__name__).info("mounting %s at %s", label, mountpoint)
            serve(lambda: os.write(write_end, _READY))
            logging.getLogger(__name__).info("unmounted %s", mountpoint)
            status = 0
            if on_unmount is not None:
                on_unmount()
        except BaseException as exc:  # report to the waiting parent, then exit
            logging.getLogger(__name__).exception("mount of %s failed", mountpoint)
            os.write(write_end, str(exc).encode(errors="replace")[:4000])
        finally:
            os._exit(status)
    os.close(write_end)
    os.waitpid(pid, 0)
    try:
        return _wait_mounted(read_end, mountpoint, fstype, log_file, timeout)
    finally:
        os.close(read_end)


def _wait_mounted(fd: int, mountpoint: str, fstype: str, log_file: Path, timeout: float) -> int:
    """Wait for the daemon's pid and its report that the kernel talks to it; return the pid."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        pid_line, newline, rest = received.partition(b"\n")
        if newline and rest.startswith(_READY):
            info = find_mount(mountpoint)
            if info is None or info.fstype != fstype:
                raise MountError(f"{mountpoint} is not listed as a {fstype} mount (see {log_file})")
            return int(pid_line)
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            raise MountError(
                f"{mountpoint} was not mounted within {timeout:.0f} s (see {log_file})"
            )
        data = os.read(fd, 4096)
        if not data:  # the daemon exited, after writing what went wrong
            text = rest.decode(errors="replace").strip()
            raise MountError(
                f"the mount process for {mountpoint} failed"
                + (f": {text}" if text else "")
                + f" (see {log_file})"
            )
        received += data

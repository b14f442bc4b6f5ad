"""Cleaning up after tests that mount: unmount whatever is left below a directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def unmount_below(path: Path) -> None:
    """Lazily unmount everything mounted below ``path``, deepest first."""
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)

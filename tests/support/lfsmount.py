"""Mount images with the real `layerfs` command for tests, and always unmount them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layerfs.fs.mounting import find_mount

LAYERFS = str(Path(sys.executable).parent / "layerfs")


def layerfs(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the layerfs CLI on a store; raise with its output if it fails and ``check``."""
    proc = subprocess.run(
        [LAYERFS, "--store", str(store), *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def public_dir(prefix: str = "lfsmnt-") -> Iterator[Path]:
    """A temp directory any user may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            force_unmount(child)
        shutil.rmtree(path, ignore_errors=True)


def force_unmount(mountpoint: Path) -> None:
    """Unmount whatever a failed test left mounted at ``mountpoint``."""
    while find_mount(mountpoint) is not None:
        if subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True).returncode:
            raise RuntimeError(f"cannot unmount {mountpoint}")


@contextmanager
def mounted(store: Path, image: str, mountpoint: Path) -> Iterator[Path]:
    """`layerfs mount` an image; `layerfs umount` it afterwards (forcibly if need be)."""
    mountpoint.mkdir(exist_ok=True)
    layerfs(store, "mount", image, str(mountpoint))
    try:
        yield mountpoint
    finally:
        if find_mount(mountpoint) is not None:
            proc = layerfs(store, "umount", str(mountpoint), check=False)
            if proc.returncode != 0:
                force_unmount(mountpoint)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    """Run a command as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )

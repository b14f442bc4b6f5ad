"""A private containerd with the layerfs snapshotter as a proxy plugin, both subprocesses.

The containerd has its own root, state, sockets and config, so the containerd
dockerd uses is never touched; ctr calls go to its socket in the namespace
``layerfs-test`` (runc state under /run/containerd/runc/layerfs-test). Paths
are short: unix socket paths are limited to 108 bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mounts import unmount_below
from tests.support.waiting import stop_process, wait_for

NAMESPACE = "layerfs-test"
# every entry below the feature image's test tree and /bin (tests.support.images): path,
# mode, owner, size, target, checksum. No link counts: overlayfs shows a lower file's own
# count (/feat/hl/link1: 3, though its other names were copied up or removed), the layerfs
# image view the names the merged tree has (1); tests check hardlinks by name.
LISTING = (
    "cd / && find feat bin | sort | while read -r p; do "
    'stat -c "%n %f %u:%g %s" "$p"; '
    '[ -L "$p" ] && readlink "$p"; '
    '[ -f "$p" ] && ! [ -L "$p" ] && md5sum "$p"; '
    "done; echo end-of-listing"
)
CONFIG = """\
version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[debug]
  address = "{base}/debug.sock"

[metrics]
  address = ""

[proxy_plugins.layerfs]
  type = "snapshot"
  address = "{snapshotter}"
"""


@dataclass
class Snapshotter:
    """A `layerfs snapshotter serve` subprocess."""

    store: Path | str  # a directory or an s3:// URL
    root: Path
    address: Path
    log: Path
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. its own LAYERFS_CACHE_DIR

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-c", "from layerfs.cli import main; main()",
                    "--store", str(self.store), "snapshotter", "serve",
                    "--address", str(self.address), "--root", str(self.root),
                ],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            )  # fmt: skip
        wait_for(
            lambda: self.address.is_socket() and _answers(self.address),
            f"the snapshotter socket {self.address} (log {self.log})",
            timeout=60,
            guard=lambda: self.proc is not None and self.proc.poll() is None,
        )

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)


def _answers(address: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(address))
        except OSError:
            return False
    return True


@dataclass
class Containerd:
    """A private containerd whose proxy snapshotter ``layerfs`` is ``snapshotter``."""

    base: Path
    snapshotter: Snapshotter
    proc: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> Path:
        return self.base / "containerd.sock"

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Run ctr against this containerd; on failure the assertion shows its output."""
        cmd = ["ctr", "--address", str(self.address), "--namespace", NAMESPACE, *args]
        done = subprocess.run(
            cmd, capture_output=True, text=True, errors="surrogateescape", timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
                f"\n--- snapshotter log:\n{tail(self.snapshotter.log)}"
            )
        return done

    def start(self) -> None:
        config = self.base / "config.toml"
        config.write_text(CONFIG.format(base=self.base, snapshotter=self.snapshotter.address))
        with open(self.base / "containerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(
            lambda: (
                self.address.is_socket()
                and subprocess.run(
                    ["ctr", "--address", str(self.address), "version"], capture_output=True
                ).returncode
                == 0
            ),
            f"containerd on {self.address} (log {self.base}/containerd.log)",
            timeout=60,
            guard=lambda: self.proc is not None and self.proc.poll() is None,
        )

    def stop(self) -> None:
        """Remove every task and container of the namespace, then stop containerd."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tasks = self.ctr("task", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            self.ctr("task", "kill", "-s", "SIGKILL", task, check=False)
        for task in tasks:
            for _ in range(100):
                if self.ctr("task", "rm", "-f", task, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", container, check=False)
        stop_process(self.proc)


def snapshot_rows(ctd: Containerd, snapshotter: str = "layerfs") -> list[list[str]]:
    """`ctr snapshots ls` of ``snapshotter`` in the namespace: sorted [key, parent, kind] rows
    (a snapshot without parent has no parent column)."""
    out = ctd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()[1:]
    return sorted(line.split() for line in out if line.strip())


def run_script(ctd: Containerd, snapshotter: str, ref: str, name: str, script: str) -> str:
    """The output of `sh -c SCRIPT` in a `ctr run --rm` container of ``ref`` on ``snapshotter``."""
    done = ctd.ctr("run", "--rm", "--snapshotter", snapshotter, ref, name, "sh", "-c", script)
    return done.stdout


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_views(base: Path) -> None:
    """Unmount the view daemons of stores below ``base`` and wait for them to exit
    (they fill the content cache in the background until then)."""
    from layerfs.fs.views import DaemonInfo, run_dir, view_answers

    for record in (run_dir() / "views").glob("*.json"):
        mount_dir = record.with_suffix("")
        info = DaemonInfo.load(mount_dir)
        if info is None or not info.cache_dir.startswith(f"{base}/"):
            continue
        with contextlib.suppress(Exception):
            if view_answers(mount_dir):
                subprocess.run(["umount", "-l", str(mount_dir)], check=False)
        if info.pid:
            gone = Path(f"/proc/{info.pid}")
            wait_for(lambda gone=gone: not gone.exists(), "a view daemon to exit")


@contextlib.contextmanager
def private_containerd(store_url: str = "") -> Iterator[Containerd]:
    """A store, a snapshotter and a containerd using it; everything removed afterwards.

    With ``store_url`` (an S3 store) the snapshotter uses that store with a local
    cache of its own (``BASE/cache``, its LAYERFS_CACHE_DIR), as another host would.
    """
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        raise AssertionError("containerd and ctr are not installed: run scripts/setup.sh")
    base = Path(tempfile.mkdtemp(prefix="lfsctd-", dir="/tmp"))
    snapshotter = Snapshotter(
        store=store_url or base / "store",
        root=base / "sn",
        address=base / "layerfs.sock",
        log=base / "snapshotter.log",
        env={"LAYERFS_CACHE_DIR": str(base / "cache")} if store_url else {},
    )
    ctd = Containerd(base, snapshotter)
    try:
        snapshotter.start()
        ctd.start()
        yield ctd
    finally:
        try:
            ctd.stop()
        finally:
            snapshotter.stop()
            unmount_below(base)
            stop_views(base)
            shutil.rmtree(base, ignore_errors=True)


def content_blobs(ctd: Containerd, count: int, timeout: float = 60.0) -> list[str]:
    """containerd's content blobs once no more than ``count`` are left: `ctr image import`
    writes the archive's index as a blob that no image references, and containerd's
    gc removes it a moment later (under load, after the import has returned)."""
    from tests.support.waiting import wait_for

    def blobs() -> list[str]:
        return ctd.ctr("content", "ls", "-q").stdout.split()

    wait_for(
        lambda: len(blobs()) <= count,
        f"containerd's content to settle to {count} blobs",
        timeout=timeout,
        interval=0.5,
    )
    return blobs()

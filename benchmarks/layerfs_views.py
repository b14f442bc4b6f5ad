"""What the benchmarks need to know about layerfs image mounts and the processes behind them.

A layerfs image mount is a kernel overlay whose first lower layer shows the
image's tree, each regular file a metacopy stub whose
``trusted.overlay.redirect`` names its content in the store's content cache
(``STORE/cache/content/data/XX/ID``), a data-only layer below. The store's view
daemon (a FUSE mount under /run/layerfs/views, whose pid its record keeps)
fills that cache in the background and serves what it lacks yet. The first
lower layer is the image's metadata tree on local disk
(``STORE/cache/meta/INDEX``) since commit c645a2c, and the image's directory
in the view daemon's mount before it (whose files showed the redirect only
once their content was cached); the helpers here work with both.

Here: the view and its daemon behind a mountpoint, the layers of a mount,
waiting until the content cache holds every file of an image, the cache's
disk use, the store's mount log, and the resident memory (RSS, PSS, peak) of
a set of processes read from /proc.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BenchError, pids_with_arg, process_tree
from layerfs.content.cache import ContentCache
from layerfs.fs.mounting import find_mount
from layerfs.fs.overlay import find_overlay
from layerfs.fs.views import ViewInfo, release_view, run_dir

REDIRECT_XATTR = "trusted.overlay.redirect"


def content_cache_root(store: Path) -> Path:
    """The content cache of a local store (``STORE/cache/content``)."""
    return store / "cache" / "content"


def cache_allocated(store: Path) -> int:
    """Bytes the content cache of ``store`` takes on disk (allocated blocks)."""
    return ContentCache(content_cache_root(store)).usage().bytes


def view_of(mountpoint: str | Path) -> ViewInfo:
    """The record of the view under the layerfs mount at ``mountpoint``."""
    overlay = find_overlay(mountpoint)
    if overlay is None or not overlay.lowers:
        raise BenchError(f"{mountpoint} is not a layerfs image mount")
    info = ViewInfo.load(overlay.lowers[0])
    if info is None:
        raise BenchError(f"the view {overlay.lowers[0]} under {mountpoint} has no record")
    return info


def view_pids(mountpoints: Iterable[str | Path]) -> list[int]:
    """The view daemons (with any children) serving the given layerfs mounts."""
    roots = {view_of(m).pid for m in mountpoints}
    if 0 in roots:
        raise BenchError("a view record has no daemon pid")
    return sorted({p for root in roots for p in process_tree(root)})


def pids_by_mountpoint(mountpoints: Iterable[str | Path]) -> list[int]:
    """Processes found the older way, by a mountpoint in their command line, with children."""
    roots = {p for m in mountpoints for p in pids_with_arg(str(m))}
    return sorted({p for root in roots for p in process_tree(root)})


def mount_layers(mountpoint: str | Path, store: Path) -> str:
    """The overlay's layers at ``mountpoint`` as `lowerdir=...::...`, with the store's
    path and the run directory shortened to STORE and RUN."""
    overlay = find_overlay(mountpoint)
    if overlay is None:
        return "not a layerfs overlay"
    text = ":".join(overlay.lowers) + "".join(f"::{d}" for d in overlay.data_layers)
    text = text.replace(os.path.realpath(store), "STORE")
    return "lowerdir=" + text.replace(str(run_dir()), "RUN")


def _uncached_files(first_lower: Path, data_dir: Path, paths: Iterable[Path] | None) -> list[Path]:
    """Regular non-empty files of an image's first lower layer whose content is not
    in the cache yet: without ``trusted.overlay.redirect`` (the FUSE view answered it
    only for cached contents), or whose redirect names no file under ``data_dir``.
    """
    if paths is None:
        paths = []
        for dirpath, _dirs, files in os.walk(first_lower):
            for name in files:
                path = Path(dirpath, name)
                st = os.lstat(path)
                if st.st_size > 0 and (st.st_mode & 0o170000) == 0o100000:
                    paths.append(path)
    missing = []
    for path in paths:
        try:
            redirect = os.getxattr(path, REDIRECT_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            missing.append(path)
            continue
        if not os.path.exists(os.path.join(data_dir, os.fsdecode(redirect).lstrip("/"))):
            missing.append(path)
    return missing


def wait_content_cached(mountpoint: str | Path, timeout: float = 600.0) -> float:
    """Wait until the view under ``mountpoint`` has every file in the content cache.

    Returns the seconds waited. Raises BenchError when the view serves bytes
    itself (a kernel without data-only overlay layers) or the fill takes longer
    than ``timeout``.
    """
    info = view_of(mountpoint)
    if not info.redirects:
        raise BenchError("the view serves file bytes itself (no data-only overlay layers)")
    start = time.monotonic()
    first, data = Path(info.path), Path(info.data_dir)
    missing = _uncached_files(first, data, None)
    while missing:
        if time.monotonic() - start > timeout:
            raise BenchError(
                f"{len(missing)} files of {info.image} were still not in the content cache "
                f"after {timeout:.0f} s (first: {missing[0]})"
            )
        time.sleep(0.1)
        missing = _uncached_files(first, data, missing)
    return time.monotonic() - start


def stop_views(store: Path) -> None:
    """Unmount the view daemon(s) of ``store`` (cleanup after a failure; the overlays
    over them must be gone already) and wait for them to exit.

    Found by the records beside the views' mounts (``RUN/views/*.json`` naming the
    store's cache directory and the daemon's pid).
    """
    cache_dir = os.path.realpath(store / "cache")
    pids = []
    for record in sorted((run_dir() / "views").glob("*.json")):
        try:
            doc = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or os.path.realpath(doc.get("cache_dir", "")) != cache_dir:
            continue
        mount_dir = str(record.with_suffix(""))
        try:
            released = release_view(mount_dir)
        except Exception:  # noqa: BLE001 - best effort: unmount it lazily then
            released = False
        if not released and find_mount(mount_dir) is not None:
            subprocess.run(["umount", "-l", mount_dir], capture_output=True)
        if doc.get("pid"):
            pids.append(int(doc["pid"]))
    wait_gone(pids, strict=False)


def mount_log_summary(store: Path, keep_as: Path) -> str:
    """Copy the store's mount log (``STORE/cache/logs/mount.log``) to ``keep_as`` and say
    how many lines it has and how many are errors and warnings, quoting the first."""
    log = store / "cache" / "logs" / "mount.log"
    if not log.exists():
        return "no mount log"
    keep_as.parent.mkdir(parents=True, exist_ok=True)
    keep_as.write_bytes(log.read_bytes())
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if " ERROR: " in line or "Traceback" in line]
    warnings = [line for line in lines if " WARNING: " in line]
    text = f"{len(lines)} lines, {len(errors)} errors, {len(warnings)} warnings"
    for kind, found in (("error", errors), ("warning", warnings)):
        if found:
            first = found[0].split(": ", 1)[-1].replace(os.path.realpath(store), "STORE")
            text += f"; first {kind}: `{first[:300]}`"
    return text


# -- memory -------------------------------------------------------------------------


@dataclass
class Memory:
    """Resident memory of a set of processes (bytes, summed over them)."""

    processes: int = 0
    rss: int = 0  # VmRSS: every page a process maps, shared pages counted in each
    pss: int = 0  # Pss: shared pages split among the processes sharing them
    peak_rss: int = 0  # VmHWM: each process's own peak


def _kib_field(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_of(pids: Iterable[int]) -> Memory:
    """RSS, PSS (from /proc/PID/smaps_rollup) and peak RSS summed over ``pids``."""
    mem = Memory()
    for pid in pids:
        rss = _kib_field(f"/proc/{pid}/status", "VmRSS")
        if not rss:
            continue  # gone, or a kernel thread
        mem.processes += 1
        mem.rss += rss
        mem.pss += _kib_field(f"/proc/{pid}/smaps_rollup", "Pss")
        mem.peak_rss += _kib_field(f"/proc/{pid}/status", "VmHWM")
    return mem


def wait_gone(pids: Iterable[int], timeout: float = 60.0, strict: bool = True) -> None:
    """Wait until none of ``pids`` runs any more (a daemon exiting after its unmount).

    ``strict``: raise BenchError if one still runs after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    left = [p for p in pids if os.path.exists(f"/proc/{p}")]
    while left:
        if time.monotonic() > deadline:
            if strict:
                raise BenchError(f"processes {left} still run {timeout:.0f} s after the unmount")
            return
        time.sleep(0.01)
        left = [p for p in left if os.path.exists(f"/proc/{p}")]

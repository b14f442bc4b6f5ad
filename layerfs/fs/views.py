"""Image views shared by every mount of an image: where they live, starting and stopping them.

One view daemon (layerfs.fs.imageview) serves an image's index at
``RUN/views/KEY/``, where RUN is ``$LAYERFS_RUN_DIR`` or ``/run/layerfs`` and
KEY names the store's cache directory and the index. Beside it,
``RUN/views/KEY.json`` records what it serves (image, index, store cache),
so commands that find a view in an overlay's ``lowerdir`` know its image
without opening the store. A view runs in its own session and outlives the
command that started it; it is unmounted when the last overlay over it goes
(``release_view``), or found unused by the view itself, which checks every
``idle_seconds()``. /run is emptied at boot, and a view whose daemon died is
found disconnected and replaced on the next mount.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from layerfs.catalog import ImageRecord
from layerfs.content.cache import ContentCache
from layerfs.fs.mounting import find_mount, mount_daemon
from layerfs.fs.overlay import data_only_layers_supported, layerfs_overlays, umount
from layerfs.store.chunks import ChunkStore

log = logging.getLogger(__name__)

VIEW_FSTYPE = "fuse.layerfs-view"
# Plain chunks a view daemon keeps: the kernel's page cache and the content
# cache hold what was read, so this only covers chunks a read straddles.
VIEW_CHUNK_CACHE = 8 << 20


def run_dir() -> Path:
    return Path(os.environ.get("LAYERFS_RUN_DIR") or "/run/layerfs")


def content_cache(store: ChunkStore) -> ContentCache:
    """The content cache of a store (under its cache directory)."""
    return ContentCache(store.backend.cache_dir() / "content")


@dataclass(frozen=True)
class ViewInfo:
    """What a view serves; kept in ``RUN/views/KEY.json``."""

    path: str  # the view's mountpoint
    image: str
    image_id: str
    index: str
    cache_dir: str  # the store's cache directory
    data_dir: str  # the content cache's data-only layer
    redirects: bool  # whether files point into the content cache
    pid: int = 0  # the view daemon

    @staticmethod
    def load(view_path: str | Path) -> ViewInfo | None:
        try:
            fields = json.loads(Path(f"{os.path.realpath(view_path)}.json").read_text())
            return ViewInfo(**fields)
        except (OSError, ValueError, TypeError):
            return None


def live_views(cache_dir: str | Path) -> list[ViewInfo]:
    """The views of the store whose cache directory is ``cache_dir`` that are mounted."""
    folder = run_dir() / "views"
    out = []
    if folder.is_dir():
        for record in sorted(folder.glob("*.json")):
            info = ViewInfo.load(record.with_suffix(""))
            mounted = find_mount(record.with_suffix("")) if info is not None else None
            if (
                info is not None
                and info.cache_dir == str(cache_dir)
                and mounted is not None
                and mounted.fstype == VIEW_FSTYPE
            ):
                out.append(info)
    return out


def contents_in_use(cache_dir: str | Path) -> set[str]:
    """Content IDs of every file of every mounted view of a store (never evicted)."""
    from layerfs.content.cache import content_id
    from layerfs.index.view import file_contents

    used: set[str] = set()
    for info in live_views(cache_dir):
        for _ino, _size, inline, packed in file_contents(Path(info.index)):
            used.add(content_id(packed, inline))
    return used


def cache_limit() -> int:
    """The content cache's bound in bytes ($LAYERFS_CACHE_MAX, e.g. 20G; default 20 GiB)."""
    from layerfs.clitools import parse_size

    return parse_size(os.environ.get("LAYERFS_CACHE_MAX") or "20G")


def trim_cache(cache: ContentCache, cache_dir: str | Path, limit: int) -> None:
    """Evict unused contents, least recently used first, until ``limit`` bytes are used."""
    if cache.usage().bytes <= limit:
        return
    removed = cache.evict(limit, contents_in_use(cache_dir))
    log.info(
        "content cache over %d bytes: evicted %d contents (%d bytes)",
        limit,
        removed.files,
        removed.bytes,
    )


def view_path(store: ChunkStore, index: Path) -> Path:
    key = hashlib.sha256(f"{store.backend.cache_dir()}\0{index}".encode()).hexdigest()[:32]
    return run_dir() / "views" / key


def view_answers(path: str | Path) -> bool:
    """Whether the view mounted at ``path`` still has its daemon (opening asks it;
    a stat may be answered from cached attributes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
        raise
    os.close(fd)
    return True


@contextmanager
def _locked(path: str | Path) -> Iterator[int]:
    """Hold the view's lock (starting, stopping and mounting over it take it)."""
    fd = os.open(f"{path}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def open_view(
    store: ChunkStore,
    record: ImageRecord,
    index: Path,
    make_store: Callable[[], ChunkStore],
    log_file: Path,
) -> Iterator[ViewInfo]:
    """The running view of ``record``'s index, started first if there is none.

    The view cannot stop while the ``with`` block runs (mount over it there).
    ``make_store`` opens the store again in the view's own process.
    """

    path = view_path(store, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = content_cache(store)
    redirects = data_only_layers_supported()
    info = ViewInfo(
        path=str(path),
        image=record.name,
        image_id=record.id,
        index=str(index),
        cache_dir=str(store.backend.cache_dir()),
        data_dir=str(cache.data_dir),
        redirects=redirects,
    )
    with _locked(path) as lock:
        mounted = find_mount(path)
        if mounted is not None and mounted.fstype == VIEW_FSTYPE:
            if view_answers(path):
                yield ViewInfo.load(path) or info
                return
            log.warning("the view at %s lost its daemon: starting a new one", path)
            umount(str(path), lazy=True)
        path.mkdir(exist_ok=True)
        cache.data_dir.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.json").write_text(json.dumps(asdict(info)) + "\n")
        if not redirects:
            log.warning(
                "this kernel (%s) has no data-only overlay layers (Linux 6.5): "
                "the view serves file bytes itself",
                os.uname().release,
            )

        def serve(on_ready: Callable[[], None] | None) -> None:
            os.close(lock)  # the daemon's copy of it would hold the lock
            _serve_view(make_store, index, cache, str(path), record.name, redirects, on_ready)

        pid = mount_daemon(
            serve,
            path,
            fstype=VIEW_FSTYPE,
            label=record.name,
            foreground=False,
            log_file=log_file,
        )
        info = replace(info, pid=pid)
        Path(f"{path}.json").write_text(json.dumps(asdict(info)) + "\n")
        yield info


def _serve_view(
    make_store: Callable[[], ChunkStore],
    index: Path,
    cache: ContentCache,
    path: str,
    name: str,
    redirects: bool,
    on_ready: Callable[[], None] | None,
) -> None:
    from layerfs.content.fill import CacheFiller
    from layerfs.fs.imageview import ImageViewFS, serve
    from layerfs.index.view import ImageView

    store = make_store()
    view = ImageView(store, index, read_ahead=True)
    cache_dir = store.backend.cache_dir()
    limit = cache_limit()
    filler = CacheFiller(view, store, cache, on_filled=lambda: trim_cache(cache, cache_dir, limit))
    if redirects:
        filler.start()
    try:
        ops = ImageViewFS(view, cache, filler, redirects=redirects)
        serve(ops, path, name, on_ready, lambda: release_view(path), idle_seconds())
    finally:
        filler.close()
        view.close()


def idle_seconds() -> float:
    """How often a view checks whether any mount still uses it ($LAYERFS_VIEW_IDLE)."""
    return float(os.environ.get("LAYERFS_VIEW_IDLE") or 30)


def release_view(view: str | Path) -> bool:
    """Unmount the view at ``view`` if no layerfs overlay uses it; whether it was."""
    target = os.path.realpath(view)
    with _locked(target):
        if any(target in m.lowers for m in layerfs_overlays()):
            return False
        mounted = find_mount(target)
        if mounted is None or mounted.fstype != VIEW_FSTYPE:
            return False
        umount(target)
        os.rmdir(target)
        Path(f"{target}.json").unlink(missing_ok=True)
    return True

"""The image views of a store: its metadata trees and one FUSE mount serving their contents.

An overlay mount of an image stands on the image's metadata tree
(layerfs.content.metatree, built once per index under ``STORE-CACHE/meta/``,
its record beside it as ``INDEX.json``), then on two data-only layers: the
content cache, and the store's view daemon (layerfs.fs.imageview) mounted at
``RUN/views/STORE/`` (RUN is ``$LAYERFS_RUN_DIR`` or ``/run/layerfs``), which
serves the contents the cache lacks yet and fills it. One process serves any
number of images and mounts. On a kernel without data-only layers the
image's directory in the view, ``RUN/views/STORE/INDEX/``, is the only lower
layer instead.

Records, so that commands know what a view shows without opening the store:

* ``RUN/views/STORE.json``: the daemon (its pid, the store's cache directory,
  the content cache's data directory, whether files redirect into it);
* ``RUN/views/STORE.d/INDEX.json``: one image (name, id, index file), written
  before the image is first looked up: the daemon opens an image when the
  kernel first asks for its directory;
* ``RUN/views/STORE.holds/PID``: a long-running process (volplugin) that keeps
  the daemon serving while it lives, so that its mounts find it running.

The daemon runs in its own session and outlives the command that started it.
It is unmounted when the last overlay using it goes and no live process holds
it (``release_view``), or found so by the daemon itself, which checks every
``idle_seconds()``. /run is emptied at boot, and a daemon that died is found
disconnected and replaced on the next mount.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerfs.errors import LayerfsError
from layerfs.fs.mounting import MountError, find_mount, mount_daemon
from layerfs.fs.overlay import data_only_layers_supported, layerfs_overlays, umount

if TYPE_CHECKING:
    from layerfs.catalog import ImageRecord
    from layerfs.content.cache import ContentCache
    from layerfs.formats.layertar import ContentKeeper
    from layerfs.store.chunks import ChunkStore

log = logging.getLogger(__name__)

VIEW_FSTYPE = "fuse.layerfs-view"
# Plain chunks a view daemon keeps: the kernel's page cache and the content
# cache hold what was read, so this only covers chunks a read straddles.
VIEW_CHUNK_CACHE = 8 << 20
CONTROL_TIMEOUT = 300.0  # seconds a request may take (a first one builds an index)


def run_dir() -> Path:
    return Path(os.environ.get("LAYERFS_RUN_DIR") or "/run/layerfs")


def content_cache(store: ChunkStore) -> ContentCache:
    """The content cache of a store (under its cache directory)."""
    from layerfs.content.cache import ContentCache

    return ContentCache(store.backend.cache_dir() / "content")


# Bumped when what a daemon serves changes (3: content IDs and directories of
# layerfs.content.cache's current form): a new version's mounts get a daemon of
# their own, while an older daemon goes on serving the mounts made over it.
VIEW_FORMAT = 3


def daemon_dir(cache_dir: str | Path) -> Path:
    """Where the view daemon of the store with this cache directory is mounted."""
    key = hashlib.sha256(f"{cache_dir}\0{VIEW_FORMAT}".encode()).hexdigest()[:24]
    return run_dir() / "views" / key


def index_name(index: Path) -> str:
    """The directory name of an image's index in its store's view."""
    return hashlib.sha256(str(index).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DaemonInfo:
    """One store's view daemon; kept in ``RUN/views/STORE.json``."""

    cache_dir: str
    data_dir: str  # the content cache's data-only layer
    redirects: bool  # whether files point into the content cache
    pid: int = 0

    @staticmethod
    def load(mount_dir: Path) -> DaemonInfo | None:
        try:
            return DaemonInfo(**json.loads(Path(f"{mount_dir}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


@dataclass(frozen=True)
class ImageInfo:
    """One image a view daemon serves; kept in ``RUN/views/STORE.d/INDEX.json``."""

    image: str
    image_id: str
    index: str
    prefetch: bool = True  # fill the content cache with every file, not only those read

    @staticmethod
    def load(records: Path, name: str) -> ImageInfo | None:
        try:
            return ImageInfo(**json.loads((records / f"{name}.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


def records_dir(mount_dir: Path) -> Path:
    return mount_dir.with_name(f"{mount_dir.name}.d")


class ViewNotRunning(MountError):
    """No view daemon serves the store, and the caller may not start one."""


def _holds_dir(mount_dir: Path) -> Path:
    return mount_dir.with_name(f"{mount_dir.name}.holds")


def hold_view(cache_dir: str | Path, pid: int) -> None:
    """Keep the view daemon of the store with this cache directory serving, even with
    nothing mounted, for as long as process ``pid`` lives (or until ``unhold_view``)."""
    mount_dir = daemon_dir(cache_dir)
    mount_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(mount_dir):
        _holds_dir(mount_dir).mkdir(exist_ok=True)
        (_holds_dir(mount_dir) / str(pid)).touch()


def unhold_view(cache_dir: str | Path, pid: int) -> None:
    """Drop ``pid``'s hold (the daemon goes at its next idle check if nothing uses it)."""
    mount_dir = daemon_dir(cache_dir)
    with _locked(mount_dir):
        (_holds_dir(mount_dir) / str(pid)).unlink(missing_ok=True)
        _held(mount_dir)  # removes the directory once empty


def _held(mount_dir: Path) -> bool:
    """Whether a live process holds the daemon (holds of dead processes are dropped);
    call with the views' lock held."""
    held = False
    holds = _holds_dir(mount_dir)
    for entry in holds.glob("[0-9]*"):
        try:
            os.kill(int(entry.name), 0)
            held = True
        except ProcessLookupError:
            entry.unlink(missing_ok=True)
        except (PermissionError, ValueError):
            held = True
    if not held:  # with the lock held: nobody is about to add a hold
        with suppress(OSError):  # gone, or not empty
            holds.rmdir()
    return held


@dataclass(frozen=True)
class ViewInfo:
    """What an overlay mount of an image stands on: its first lower layer (the image's
    metadata tree, or on an old kernel its directory in the view), and what it shows."""

    path: str  # the overlay's first lower layer
    image: str
    image_id: str
    index: str
    daemon: str  # the store's view daemon's mount
    cache_dir: str  # the store's cache directory
    data_dir: str  # the content cache's data-only layer
    redirects: bool  # whether files point into the content cache
    pid: int = 0  # the view daemon
    prefetch: bool = True  # as for ImageInfo

    @property
    def data_layers(self) -> list[Path]:
        """The overlay's data-only layers: the content cache, then the view's contents."""
        return [Path(self.data_dir), Path(self.daemon)] if self.redirects else []

    @staticmethod
    def load(view_path: str | Path) -> ViewInfo | None:
        """The view an overlay lists as its first lower layer ``view_path``, or None."""
        path = Path(os.path.realpath(view_path))
        try:  # a metadata tree has its record beside it
            doc = json.loads(Path(f"{path}.json").read_text())
            image = ImageInfo(
                doc["image"], doc["image_id"], doc["index"], bool(doc.get("prefetch", True))
            )
            mount_dir = doc["daemon"]
        except (OSError, ValueError, TypeError, KeyError):
            image, mount_dir = ImageInfo.load(records_dir(path.parent), path.name), path.parent
        daemon = DaemonInfo.load(Path(mount_dir))
        if daemon is None or image is None:
            return None
        return ViewInfo(str(path), **asdict(image), daemon=str(mount_dir), **asdict(daemon))


def _mounted_images(mount_dir: Path) -> set[str]:
    """First lower layers of the overlay mounts that use a view daemon."""
    prefix = f"{mount_dir}/"
    return {
        m.lowers[0]
        for m in layerfs_overlays()
        if m.lowers and (str(mount_dir) in m.data_layers or m.lowers[0].startswith(prefix))
    }


def live_views(cache_dir: str | Path) -> list[ViewInfo]:
    """The views of a store's images that some mount uses."""
    mount_dir = daemon_dir(cache_dir)
    out = []
    for path in sorted(_mounted_images(mount_dir)):
        info = ViewInfo.load(path)
        if info is not None:
            out.append(info)
    return out


def image_contents(index: Path) -> set[str]:
    """Content IDs of every file of the image whose index is ``index``."""
    from layerfs.content.cache import content_id
    from layerfs.index.view import file_contents

    return {content_id(packed, inline) for _ino, _size, inline, packed in file_contents(index)}


def contents_in_use(cache_dir: str | Path) -> set[str]:
    """Content IDs of every file of every mounted image of a store (never evicted)."""
    used: set[str] = set()
    for info in live_views(cache_dir):
        used |= image_contents(Path(info.index))
    return used


def forget_image(store: ChunkStore, record: ImageRecord) -> int:
    """Remove the index and metadata tree this host built for ``record``, an image
    just removed from the store; return the bytes freed.

    Both are kept while another image of the store has the same layers (and so
    the same index) or a mount uses them; they are only local caches, made
    again at the next mount if needed.
    """
    from layerfs.catalog import Catalog
    from layerfs.content.metatree import meta_tree_path
    from layerfs.index import index_path

    index = index_path(store, record)
    cache_dir = store.backend.cache_dir()
    others = {index_path(store, image) for image in Catalog(store.backend).images()}
    mounted = {Path(view.index).resolve() for view in live_views(cache_dir)}
    if index in others or index.resolve() in mounted:
        return 0
    freed = 0
    meta = meta_tree_path(cache_dir / "meta", index)
    if meta.is_dir():
        freed += _disk_usage(meta)
        shutil.rmtree(meta)
    for path in (index, index.with_name(index.name + "-wal"), index.with_name(index.name + "-shm")):
        try:
            freed += path.stat().st_blocks * 512
            path.unlink()
        except FileNotFoundError:
            pass
    return freed


def _disk_usage(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def cache_limit() -> int:
    """The content cache's bound in bytes ($LAYERFS_CACHE_MAX, e.g. 20G; default 20 GiB)."""
    from layerfs.clitools import parse_size

    return parse_size(os.environ.get("LAYERFS_CACHE_MAX") or "20G")


def trim_cache(
    cache: ContentCache, cache_dir: str | Path, limit: int, filled: Path | None = None
) -> None:
    """Evict unused contents, least recently used first, until ``limit`` bytes are used.

    Contents of mounted images stay, and so do those of ``filled``, the index of an
    image a view has just filled: its first overlay may not be mounted yet.
    """
    if cache.usage().bytes <= limit:
        return
    keep = contents_in_use(cache_dir)
    if filled is not None:
        keep |= image_contents(filled)
    removed = cache.evict(limit, keep)
    log.info(
        "content cache over %d bytes: evicted %d contents (%d bytes)",
        limit,
        removed.files,
        removed.bytes,
    )


@contextmanager
def cache_filling(store: ChunkStore) -> Iterator[ContentKeeper]:
    """A keeper that puts the files an import reads into the store's content cache.

    The contents are named in the cache when the block ends without an error
    (dropped otherwise); then the cache is trimmed to its bound, as after any fill.
    """
    from layerfs.content.imported import CacheKeeper

    cache = content_cache(store)
    batch = cache.batch()
    try:
        yield CacheKeeper(batch)
    except BaseException:
        batch.discard()
        raise
    try:  # the cache is only a cache: the import has succeeded whatever happens here
        named = batch.finish()
        log.info("import: %d contents put into the content cache", named)
        trim_cache(cache, store.backend.cache_dir(), cache_limit())
    except OSError as exc:
        batch.discard()
        log.warning("the imported files' contents were not put into the content cache: %s", exc)


def prepare_view(store: ChunkStore, record: ImageRecord) -> None:
    """Build the image's index and metadata tree now, not at its first mount: an import
    that filled the content cache does, so that its first mount finds the image ready,
    as a first `docker run` finds the layers `docker load` extracted. A failure is only
    logged: the import stands, and the first mount builds them."""
    try:
        _image_files(store, record, content_cache(store), data_only_layers_supported())
    except (OSError, LayerfsError) as exc:
        log.warning("the image's index is built at its first mount, not now: %s", exc)


def view_answers(path: str | Path) -> bool:
    """Whether the view mounted at ``path`` (or a directory of it) still has its daemon
    (opening asks it; a stat may be answered from cached attributes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return False
        raise
    os.close(fd)
    return True


def view_serves(view: ViewInfo) -> bool:
    """Whether the daemon of a mount's view still serves (else the mount is stale)."""
    try:
        return view_answers(view.daemon)
    except OSError:
        return False


@contextmanager
def _locked(mount_dir: Path) -> Iterator[int]:
    """Hold the views' lock (starting and stopping a daemon, and mounting over one,
    take it). One lock for all stores' daemons: a file per store would pile up in
    /run, and none can be removed safely while someone may wait on it."""
    fd = os.open(mount_dir.parent / ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


@contextmanager
def open_view(
    store: ChunkStore,
    record: ImageRecord,
    make_store: Callable[[], ChunkStore],
    log_file: Path,
    *,
    prefetch: bool = True,
    start: bool = True,
) -> Iterator[ViewInfo]:
    """The view of ``record``, its store's daemon started first if none runs.

    The daemon cannot stop while the ``with`` block runs (mount over it there).
    ``make_store`` opens the store again in the daemon's own process. Without
    ``prefetch`` the daemon caches only the contents that are read. Without
    ``start`` a store whose daemon does not run raises ViewNotRunning (starting
    one forks: a threaded process must leave that to a process of its own).
    """
    cache_dir = store.backend.cache_dir()
    mount_dir = daemon_dir(cache_dir)
    mount_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = content_cache(store)
    cache.data_dir.mkdir(parents=True, exist_ok=True)
    index, meta = _image_files(store, record, cache, data_only_layers_supported())
    with _locked(mount_dir) as lock:
        daemon = _running_daemon(mount_dir)
        if daemon is None and not start:
            raise ViewNotRunning(f"no image view serves the store cached in {cache_dir}")
        if daemon is None:
            daemon = _start_daemon(make_store, mount_dir, cache, log_file, lock)
        yield _register(
            mount_dir, daemon, ImageInfo(record.name, record.id, str(index), prefetch), meta
        )


def _image_files(
    store: ChunkStore, record: ImageRecord, cache: ContentCache, redirects: bool
) -> tuple[Path, Path | None]:
    """The image's index and, when files redirect into the content cache, its metadata
    tree: each built first if missing (both under the store's cache directory)."""
    from layerfs.content.metatree import ensure_meta_tree
    from layerfs.index import ensure_index

    index = Path(os.path.abspath(ensure_index(store, record)))
    meta = ensure_meta_tree(index, cache, cache.root.parent / "meta") if redirects else None
    return index, meta


def _register(mount_dir: Path, daemon: DaemonInfo, image: ImageInfo, meta: Path | None) -> ViewInfo:
    """Name ``image`` to its daemon and have it opened; its view."""
    name = index_name(Path(image.index))
    _write_json(records_dir(mount_dir) / f"{name}.json", asdict(image))
    path = mount_dir / name
    os.stat(path)  # the daemon opens the image now and starts filling the cache
    if meta is not None and daemon.redirects:
        _write_json(Path(f"{meta}.json"), {**asdict(image), "daemon": str(mount_dir)})
        path = meta
    return ViewInfo(str(path), **asdict(image), daemon=str(mount_dir), **asdict(daemon))


def control_socket(mount_dir: Path) -> Path:
    """Where a store's view daemon answers requests for views (``asked_view``)."""
    return mount_dir.with_name(f"{mount_dir.name}.sock")


@contextmanager
def asked_view(cache_dir: Path, image: str, *, prefetch: bool = True) -> Iterator[ViewInfo | None]:
    """The view of the store's image ``image`` (a name or ID) from the store's running
    daemon, which has the store open: no store is opened and no key derived here.
    None when no daemon serves the store (open it and use ``open_view`` instead). As in
    ``open_view``, the daemon cannot stop while the ``with`` block runs."""
    mount_dir = daemon_dir(cache_dir)
    view = None
    if control_socket(mount_dir).exists():
        with _locked(mount_dir):
            if _running_daemon(mount_dir) is not None:
                view = _ask(control_socket(mount_dir), {"image": image, "prefetch": prefetch})
            yield view
            return
    yield view


def _ask(path: Path, request: dict) -> ViewInfo | None:
    """One request to a view daemon; None if it cannot be asked (it has no socket yet)."""
    from layerfs.unixsock import ask_line

    try:
        doc = ask_line(path, request, CONTROL_TIMEOUT)
    except OSError as exc:
        raise MountError(f"the image view at {path} did not answer: {exc}") from exc
    except ValueError as exc:
        raise MountError(f"the image view at {path} answered nonsense: {exc}") from exc
    if doc is None:
        return None
    if "error" in doc:
        raise LayerfsError(str(doc["error"]))
    try:
        return ViewInfo(**doc["view"])
    except (TypeError, KeyError) as exc:
        raise MountError(f"the image view at {path} answered nonsense: {doc!r:.200}") from exc


def _view_answerer(
    store: ChunkStore, cache: ContentCache, mount_dir: Path, redirects: bool
) -> Callable[[dict], dict]:
    """In a view daemon: what it answers on its control socket (see ``asked_view``)."""
    from layerfs.catalog import Catalog

    def answer(request: dict) -> dict:
        try:
            record = Catalog(store.backend).get_image(str(request["image"]))
            index, meta = _image_files(store, record, cache, redirects)
            daemon = DaemonInfo.load(mount_dir)
            if daemon is None:
                raise LayerfsError(f"the image view at {mount_dir} lost its record")
            image = ImageInfo(
                record.name, record.id, str(index), bool(request.get("prefetch", True))
            )
            return {"view": asdict(_register(mount_dir, daemon, image, meta))}
        except LayerfsError as exc:
            return {"error": str(exc)}
        except (OSError, KeyError, TypeError) as exc:
            log.exception("cannot answer a request for a view")
            return {"error": f"the image view failed: {exc}"}

    return answer


def _running_daemon(mount_dir: Path) -> DaemonInfo | None:
    mounted = find_mount(mount_dir)
    if mounted is None or mounted.fstype != VIEW_FSTYPE:
        return None
    if view_answers(mount_dir):
        return DaemonInfo.load(mount_dir)
    log.warning("the view at %s lost its daemon: starting a new one", mount_dir)
    umount(str(mount_dir), lazy=True)
    return None


def _start_daemon(
    make_store: Callable[[], ChunkStore],
    mount_dir: Path,
    cache: ContentCache,
    log_file: Path,
    lock: int,
) -> DaemonInfo:
    redirects = data_only_layers_supported()
    mount_dir.mkdir(exist_ok=True)
    records = records_dir(mount_dir)
    if records.exists():  # images of a daemon that died: looked up again from the new one
        shutil.rmtree(records)
    records.mkdir()
    cache.data_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache.root.parent
    limit = cache_limit()

    def serve(on_ready: Callable[[], None] | None) -> None:
        os.close(lock)  # the daemon's copy of it would hold the lock
        from layerfs.fs.imageview import ImageViewFS, serve_views

        if not redirects:  # in the daemon: its log is the store's mount log
            log.warning(
                "this kernel (%s) has no data-only overlay layers (Linux 6.5), or "
                "LAYERFS_DATA_ONLY_LAYERS=off: the view serves file bytes itself",
                os.uname().release,
            )
        store = make_store()
        # the store's pack indexes, loaded now rather than at the first read
        threading.Thread(target=_preload, args=(store,), name="view-preload", daemon=True).start()

        def trim(filled: Path) -> None:
            trim_cache(cache, cache_dir, limit, filled)

        ops = ImageViewFS(store, records, cache, redirects, trim)
        try:
            serve_views(
                ops,
                str(mount_dir),
                on_ready,
                lambda: release_view(mount_dir),
                idle_seconds(),
                (control_socket(mount_dir), _view_answerer(store, cache, mount_dir, redirects)),
            )
        finally:
            ops.close()

    daemon = DaemonInfo(str(cache_dir), str(cache.data_dir), redirects)
    _write_json(Path(f"{mount_dir}.json"), asdict(daemon))
    pid = mount_daemon(
        serve, mount_dir, fstype=VIEW_FSTYPE, label="layerfs", foreground=False, log_file=log_file
    )
    daemon = DaemonInfo(daemon.cache_dir, daemon.data_dir, redirects, pid)
    _write_json(Path(f"{mount_dir}.json"), asdict(daemon))
    return daemon


def _preload(store: ChunkStore) -> None:
    try:
        store.backend.refresh()
    except LayerfsError as exc:  # the first read tries again, and says what failed
        log.warning("cannot read the store's indexes ahead of reads: %s", exc)


def idle_seconds() -> float:
    """How often a view daemon checks whether any mount still uses it ($LAYERFS_VIEW_IDLE)."""
    return float(os.environ.get("LAYERFS_VIEW_IDLE") or 30)


def start_view(store: ChunkStore, make_store: Callable[[], ChunkStore], log_file: Path) -> int:
    """Start the store's view daemon if none runs (it forks); return its pid."""
    cache_dir = store.backend.cache_dir()
    mount_dir = daemon_dir(cache_dir)
    mount_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = content_cache(store)
    with _locked(mount_dir) as lock:
        daemon = _running_daemon(mount_dir)
        if daemon is None:
            daemon = _start_daemon(make_store, mount_dir, cache, log_file, lock)
        return daemon.pid


def release_view(view: str | Path) -> bool:
    """Unmount the view daemon serving ``view`` (its mount or an image's directory in it)
    if no layerfs overlay uses any of its images and no live process holds it; return
    whether it was."""
    path = Path(os.path.realpath(view))
    mount_dir = path if DaemonInfo.load(path) is not None else path.parent
    if DaemonInfo.load(mount_dir) is None:
        return False
    with _locked(mount_dir):
        if _mounted_images(mount_dir) or _held(mount_dir):
            return False
        mounted = find_mount(mount_dir)
        if mounted is None or mounted.fstype != VIEW_FSTYPE:
            return False
        umount(str(mount_dir))
        control_socket(mount_dir).unlink(missing_ok=True)
        os.rmdir(mount_dir)
        shutil.rmtree(records_dir(mount_dir), ignore_errors=True)
        Path(f"{mount_dir}.json").unlink(missing_ok=True)
    return True

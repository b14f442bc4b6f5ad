"""The local-directory object store, and the packed repository layer over it.

Layout::

    packs/ab/<id>          pack files (layerfs.store.packs), ~16 MiB each
    index/<id>             index objects naming the packs' blobs
    docs/images/NAME.json  named documents (an encrypted repository encrypts the
                           part after the folder: layerfs.repo.repository)
    tmp/                   files being written (never read as objects)
    cache/                 derived state: image indexes
    lock                   flock(2) target: shared for writers, exclusive for gc
    locks/PID-RANDOM       who holds the lock: pid, host, command, mode, since

``LocalObjects`` is the dumb object store: a write goes to a temp file in tmp/,
is fsynced and renamed into place (then its directory is fsynced), so a crash
never leaves a partial object under its final name; ``create`` hard-links the
temp file, which fails if the name exists. Range reads are one pread. The
packing, the index and repacking are those of every store
(layerfs.store.packed): ``LocalBackend``. No read cache sits in front of it:
the kernel's page cache already keeps what is read often.

The store is private to its owner whatever the umask: directories are made 0700
and files 0600, and opening an existing store makes its top directory, its
subdirectories and the lock 0700/0600 again. Taking the lock waits at most
``lock_timeout`` seconds (default LAYERFS_LOCK_TIMEOUT, else 60); a caller that
gives up gets a StoreLocked naming the processes that hold it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store.location import local_cache_dir
from layerfs.store.objects import ObjectStats, ObjectStore
from layerfs.store.packed import PackedBackend

_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2
_OPEN_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_OPEN_READ = os.O_RDONLY | os.O_CLOEXEC
PACK_SIZE = 16 << 20
DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_TIMEOUT_ENV = "LAYERFS_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0  # seconds lock() waits before it names the holder
_LOCK_POLL_MAX = 0.2  # seconds between tries at the most
_MAX_COMMAND = 300  # characters of a holder's command line recorded
_SUBDIRS = ("packs", "index", "docs", "tmp", "cache", "locks")


class StoreLocked(StoreError):
    """The store's lock was not free within the timeout; the message names its holders."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_temp(data: bytes, tmp_dir: Path) -> str:
    """A new file in ``tmp_dir`` holding ``data``, fsynced; its path."""
    fd, tmp = _mkstemp(tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, fsync(dir)."""
    tmp = _durable_temp(data, tmp_dir)
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.rename(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(path.parent)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_whole(fd: int) -> bytes:
    """Every byte of the file open as ``fd``, in one read when its size holds still."""
    want = os.fstat(fd).st_size + 1  # one more: a short read then means the end
    data = os.read(fd, want)
    if len(data) < want:
        return data
    parts = [data]
    while piece := os.read(fd, 1 << 20):
        parts.append(piece)
    return b"".join(parts)


def _mkstemp(tmp_dir: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=tmp_dir, prefix="w-")  # mode 0600


def lock_timeout_default() -> float:
    """LAYERFS_LOCK_TIMEOUT in seconds, else DEFAULT_LOCK_TIMEOUT."""
    text = os.environ.get(LOCK_TIMEOUT_ENV)
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise StoreError(
            f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds: give one such as 60"
        )
    return value


def _make_private(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` unless it has it; a store of another owner is left alone."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o7777 != mode:
            os.chmod(path, mode)
    except (FileNotFoundError, PermissionError):
        pass


def _own_command() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return text if len(text) <= _MAX_COMMAND else text[:_MAX_COMMAND] + "..."


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quiet(path: str | Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def _store_error(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on the store's disk while writing {what}")
    return StoreError(f"cannot write {what}: {exc.strerror}")


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length and (more := os.pread(fd, length - got, offset + got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _refuse_loose_objects(root: Path) -> None:
    """A store of an earlier layerfs kept one file per blob under objects/: refuse it."""
    with suppress(OSError), os.scandir(root / "objects") as entries:
        if any(True for _ in entries):
            raise StoreError(
                f"the store at {root} was written by an earlier layerfs (one file per object "
                "under objects/), whose format this version does not read; start a new store "
                "elsewhere and import the images again"
            )


class LocalObjects(ObjectStore):
    """Objects as files under a directory, and its flock; see the module docstring."""

    def __init__(self, root: Path, *, lock_timeout: float | None = None) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.stats = ObjectStats()
        self.lock_timeout = lock_timeout_default() if lock_timeout is None else lock_timeout
        _refuse_loose_objects(self.root)
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            _make_private(self.root, DIR_MODE)
            for sub in _SUBDIRS:
                (self.root / sub).mkdir(mode=DIR_MODE, exist_ok=True)
                _make_private(self.root / sub, DIR_MODE)
            _make_private(self.root / "lock", FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.root}: {exc.strerror}") from exc
        self._tmp = self.root / "tmp"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def get(self, rel: str, what: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            fd = os.open(self._path(rel), _OPEN_READ)
        except FileNotFoundError:
            raise ObjectMissing(f"{what} is missing from the store {self.url}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {what} in {self.url}: {exc.strerror}") from exc
        try:
            if start is None:
                data = read_whole(fd)
            else:
                if start < 0 or end is None:
                    size = os.fstat(fd).st_size
                    start, end = (max(size + start, 0), size) if start < 0 else (start, size)
                data = _pread_all(fd, end - start, start)
        except OSError as exc:
            raise StoreError(f"cannot read {what} in {self.url}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        self.stats.count("bytes_down", len(data))
        return data

    def _mkdirs(self, path: Path) -> None:
        """Create the folders above ``path`` durably (each new one's parent is fsynced)."""
        missing = []
        folder = path.parent
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            with suppress(FileExistsError):
                os.mkdir(folder, DIR_MODE)
            fsync_dir(folder.parent)

    def put(self, rel: str, data: bytes, what: str) -> None:
        path = Path(self._path(rel))
        try:
            self._mkdirs(path)
            write_atomic(path, data, self._tmp)
        except OSError as exc:
            raise _store_error(exc, what) from exc
        self.stats.count("bytes_up", len(data))

    def create(self, rel: str, data: bytes, what: str) -> bool:
        """Written to a temp file and hard-linked into place: link(2) fails if the name exists."""
        path = Path(self._path(rel))
        tmp = ""
        try:
            tmp = _durable_temp(data, self._tmp)
            self._mkdirs(path)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_dir(path.parent)
        except OSError as exc:
            raise _store_error(exc, what) from exc
        finally:
            if tmp:
                _unlink_quiet(tmp)
        self.stats.count("bytes_up", len(data))
        return True

    def delete(self, rels: list[str], what: str) -> None:
        folders = set()
        try:
            for rel in rels:
                with suppress(FileNotFoundError):
                    os.unlink(self._path(rel))
                    folders.add(os.path.dirname(self._path(rel)))
            for folder in folders:
                fsync_dir(Path(folder))
        except OSError as exc:
            raise StoreError(f"cannot delete {what} in {self.url}: {exc.strerror}") from exc

    def _walk(self, prefix: str) -> Iterator[os.DirEntry]:
        """The files whose name starts with ``prefix`` (walking its folder)."""
        folder, _, start = prefix.rpartition("/")
        stack = [self._path(folder) if folder else str(self.root)]
        top = True
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if top and not entry.name.startswith(start):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    yield entry
            top = False

    def _rel(self, entry: os.DirEntry) -> str:
        return entry.path[len(str(self.root)) + 1 :]

    def list(self, prefix: str) -> list[str]:
        return sorted(self._rel(e) for e in self._walk(prefix))

    def list_times(self, prefix: str) -> tuple[dict[str, float], float]:
        out = {}
        for entry in self._walk(prefix):
            with suppress(FileNotFoundError):
                out[self._rel(entry)] = entry.stat(follow_symlinks=False).st_mtime
        return out, time.time()

    def holds_any(self, prefixes: tuple[str, ...]) -> bool:
        return any(next(self._walk(p), None) is not None for p in prefixes)

    # -- coordination ------------------------------------------------------
    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Hold the lock (flock of ``lock``), waiting at most ``lock_timeout`` seconds.

        While it is held, ``locks/PID-RANDOM`` says who holds it, so that a caller
        that times out can name the holder.
        """
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise StoreError(
                f"cannot open the lock of the store {self.url}: {exc.strerror}"
            ) from exc
        try:
            self._acquire(fd, exclusive)
            if exclusive:
                self.lock_holders(forget_dead=True)  # left by killed processes
            note = self._note_holder(exclusive)
            try:
                yield
            finally:
                if note is not None:
                    _unlink_quiet(note)
        finally:
            os.close(fd)

    def _acquire(self, fd: int, exclusive: bool) -> None:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.lock_timeout
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, op)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreLocked(self._locked_message(exclusive))
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LOCK_POLL_MAX)

    def _note_holder(self, exclusive: bool) -> str | None:
        """Record this process as a holder; None if it cannot be written (not needed)."""
        doc = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": _own_command(),
            "mode": "exclusive" if exclusive else "shared",
            "since": time.time(),
        }
        path = f"{self.root}/locks/{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(path, _OPEN_TMP, FILE_MODE)
            try:
                write_all(fd, json.dumps(doc).encode())
            finally:
                os.close(fd)
        except OSError:
            return None
        return path

    def lock_holders(self, *, forget_dead: bool = False) -> list[dict]:
        """The recorded holders of the lock whose process is still alive (on this host).

        With ``forget_dead`` (under the exclusive lock) the notes of dead ones are removed.
        """
        here = socket.gethostname()
        out = []
        try:
            names = sorted(os.listdir(self.root / "locks"))
        except OSError:
            return []
        for name in names:
            try:
                doc = json.loads((self.root / "locks" / name).read_bytes())
                pid = int(doc["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if doc.get("host") == here and not pid_alive(pid):
                if forget_dead:
                    _unlink_quiet(self.root / "locks" / name)
                continue
            out.append(doc)
        return out

    def _locked_message(self, exclusive: bool) -> str:
        want = "exclusive" if exclusive else "shared"
        holders = [h for h in self.lock_holders() if exclusive or h.get("mode") == "exclusive"]
        if holders:
            who = "; ".join(
                f"pid {h.get('pid')} on {h.get('host')} ({h.get('mode')}, "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h.get('since', 0)))}"
                f"): {h.get('command') or '?'}"
                for h in holders
            )
        else:
            who = "a process that did not record itself (see /proc/locks)"
        return (
            f"the {want} lock of the store {self.url} was not free within "
            f"{self.lock_timeout:g} s; held by {who}. Wait for it to finish or stop it; "
            f"{LOCK_TIMEOUT_ENV} sets how long to wait"
        )

    def cache_dir(self) -> Path:
        return local_cache_dir(self.root)

    def clean_tmp(self) -> int:
        """Remove temp files left by killed writers; return how many were removed.

        Only safe under the exclusive lock (no writer is running).
        """
        n = 0
        with os.scandir(self._tmp) as entries:
            found = list(entries)
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                n += sum(len(files) for _, _, files in os.walk(entry.path)) + 1
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _unlink_quiet(entry.path)
                n += 1
        return n


class LocalBackend(PackedBackend):
    """The packed repository layer over LocalObjects; see the module docstring."""

    def __init__(self, root: Path, *, lock_timeout: float | None = None) -> None:
        objects = LocalObjects(root, lock_timeout=lock_timeout)
        super().__init__(objects, pack_size=PACK_SIZE, write_threads=1)
        self.root = objects.root

    def object_path(self, rel: str) -> Path:
        """The file holding an object (for tools that read or damage it directly)."""
        return self.root / rel

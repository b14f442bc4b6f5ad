"""A store backend in a local directory.

Layout::

    objects/ab/abcdef...   blobs, named by digest
    docs/images/NAME.json  named documents (an encrypted repository encrypts the
                           part after the folder: layerfs.repo.repository)
    tmp/                   files being written (never read as objects)
    tmp/b-PID-RANDOM/      blobs being written by one writer, until its flush
    cache/                 derived state: image indexes
    lock                   flock(2) target: shared for writers, exclusive for gc
    locks/PID-RANDOM       who holds the lock: pid, host, command, mode, since

The store is private to its owner whatever the umask: directories are made 0700
and files 0600, and opening an existing store makes its top directory, its
subdirectories and the lock 0700/0600 again. Taking the lock waits at most
``lock_timeout`` seconds (default LAYERFS_LOCK_TIMEOUT, else 60); a caller that
gives up gets a StoreLocked naming the processes that hold it.

Blob writes are batched: each goes to tmp/ first, and ``flush`` makes the batch
durable with one syncfs(2) before renaming it into objects/, so a crash never
leaves a partial object under its final name and imports do not pay one fsync
per chunk. Each temp file's writeback is started as soon as it is written
(sync_file_range), so the disk works while the writer goes on and the syncfs
waits for little. A writer's temp blobs share a directory of their own, made
when needed and removed once flushed; tmp/ and objects/ ask ext4 to spread
their subdirectories (see fsflags), which keeps file creation cheap right after
a large delete. Put_blob is safe to call from several threads. Doc writes use
write, fsync, rename, fsync(dir).

One-pass readers that need blobs in order (layer tars) get them through
``read_blobs_in_order``: a helper thread opens the next blobs and starts their
reads with posix_fadvise, so many small files are read from the disk at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store.backend import Backend, check_digest, check_doc_name
from layerfs.store.fsflags import spread_subdirs

_libc = ctypes.CDLL(None, use_errno=True)
_FLUSH_COUNT = 2048
_FLUSH_BYTES = 256 << 20
_SYNC_FILE_RANGE_WRITE = 2
_OPEN_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_OPEN_READ = os.O_RDONLY | os.O_CLOEXEC
OPEN_BATCH = 16  # blobs a reader's helper thread opens per job
DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_TIMEOUT_ENV = "LAYERFS_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0  # seconds lock() waits before it names the holder
_LOCK_POLL_MAX = 0.2  # seconds between tries at the most
_MAX_COMMAND = 300  # characters of a holder's command line recorded


class StoreLocked(StoreError):
    """The store's lock was not free within the timeout; the message names its holders."""


def syncfs(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (one syscall)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


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


def _read_file(path: str) -> bytes:
    """The whole content of a file (no pathlib: this is the path of every chunk read)."""
    fd = os.open(path, _OPEN_READ)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) != size:  # short, or the file grew: read on to the end
            parts = [data]
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


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


Opened = list[tuple[str, int | StoreError]]  # blobs a helper opened: digest, fd or error


def _batches(items: Iterable[str], size: int) -> Iterator[tuple[str, ...]]:
    it = iter(items)
    while batch := tuple(itertools.islice(it, size)):
        yield batch


def _read_opened(opened: Opened) -> Iterator[bytes]:
    """The bytes of each opened blob in order (closing it), or its error when its turn comes."""
    for i, (digest, fd) in enumerate(opened):
        try:
            if isinstance(fd, StoreError):
                raise fd
            try:
                data = read_whole(fd)
            except OSError as exc:
                raise StoreError(f"cannot read object {digest}: {exc.strerror}") from exc
            finally:
                os.close(fd)
            yield data
        except BaseException:  # an error, or the reader stopped (GeneratorExit)
            _close_opened(opened[i + 1 :])
            raise


def _close_opened(opened: Opened) -> None:
    for _digest, fd in opened:
        if isinstance(fd, int):
            os.close(fd)


def _write_new(path: str, data: bytes, what: str) -> None:
    """Create ``path`` with ``data`` and start its writeback; StoreError on failure."""
    try:
        fd = os.open(path, _OPEN_TMP, FILE_MODE)
        try:
            write_all(fd, data)
            start_writeback(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink_quiet(path)
        raise _store_error(exc, what) from exc


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


def _pid_alive(pid: int) -> bool:
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


class LocalBackend(Backend):
    """Blobs and docs in a directory; see the module docstring."""

    def __init__(self, root: Path, *, lock_timeout: float | None = None) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.lock_timeout = lock_timeout_default() if lock_timeout is None else lock_timeout
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            _make_private(self.root, DIR_MODE)
            for sub in ("objects", "docs", "tmp", "cache", "locks"):
                (self.root / sub).mkdir(mode=DIR_MODE, exist_ok=True)
                _make_private(self.root / sub, DIR_MODE)
            _make_private(self.root / "lock", FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {self.root}: {exc.strerror}") from exc
        self._tmp = self.root / "tmp"
        self._objects = str(self.root / "objects")
        for sub in (self._tmp, self._objects):
            spread_subdirs(sub)
        self._writer_dir: str | None = None  # tmp/b-<pid>-<random>, made by put_blob
        self._writing = 0  # put_blob calls writing into _writer_dir
        self._tmp_seq = itertools.count()
        self._pending: dict[str, str] = {}  # digest -> temp path
        self._pending_bytes = 0
        self._mutex = threading.Lock()

    def _blob_path(self, digest: str) -> Path:
        return Path(self._blob_name(digest))

    def _blob_name(self, digest: str) -> str:
        return f"{self._objects}/{digest[:2]}/{digest}"

    # -- blobs -------------------------------------------------------------
    def put_blob(self, digest: str, data: bytes) -> bool:
        check_digest(digest)
        with self._mutex:
            if digest in self._pending:
                return False
            folder = self._writer_dir or self._make_writer_dir()
            self._writing += 1
        full = False
        try:
            if os.path.exists(self._blob_name(digest)):
                return False
            tmp = f"{folder}/{next(self._tmp_seq)}"
            _write_new(tmp, data, f"object {digest}")
            with self._mutex:
                if digest in self._pending:
                    _unlink_quiet(tmp)
                    return False
                self._pending[digest] = tmp
                self._pending_bytes += len(data)
                full = len(self._pending) >= _FLUSH_COUNT or self._pending_bytes >= _FLUSH_BYTES
        finally:
            with self._mutex:
                self._writing -= 1
        if full:
            self.flush()
        return True

    def _make_writer_dir(self) -> str:
        """Create this writer's temp directory (called holding the mutex)."""
        folder = f"{self._tmp}/b-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(folder, DIR_MODE)
        except OSError as exc:
            raise _store_error(exc, "a temp directory") from exc
        self._writer_dir = folder
        return folder

    def _drop_writer_dir(self) -> None:
        """Remove the writer's temp directory once nothing is in it (holding the mutex)."""
        if self._writer_dir is not None and not self._writing and not self._pending:
            with suppress(OSError):
                os.rmdir(self._writer_dir)
            self._writer_dir = None

    def get_blob(self, digest: str) -> bytes:
        check_digest(digest)
        with self._mutex:
            tmp = self._pending.get(digest)
        try:
            return _read_file(tmp or self._blob_name(digest))
        except FileNotFoundError:
            if tmp:  # flushed meanwhile
                return _read_file(self._blob_name(digest))
            raise ObjectMissing(f"object {digest} is missing from the store {self.url}") from None

    def read_blobs_in_order(
        self, digests: Iterable[str], ahead: int = 64
    ) -> Generator[bytes, None, None]:
        """Blobs in order; the next ``ahead`` are open and being read by the kernel.

        A helper thread opens the blobs ahead of their turn, OPEN_BATCH at a
        time, and announces each with posix_fadvise(WILLNEED), which starts its
        read without waiting; so the disk serves many small files at once while
        the caller reads them in order. See Backend.read_blobs_in_order.
        """
        with ThreadPoolExecutor(1, thread_name_prefix="layerfs-open") as pool:
            queued: deque[Future[Opened]] = deque()
            try:
                for batch in _batches(digests, OPEN_BATCH):
                    queued.append(pool.submit(self._open_blobs, batch))
                    if len(queued) * OPEN_BATCH >= ahead:
                        yield from _read_opened(queued.popleft().result())
                while queued:
                    yield from _read_opened(queued.popleft().result())
            finally:
                for future in queued:
                    if not future.cancel():
                        _close_opened(future.result())

    def _open_blobs(self, digests: tuple[str, ...]) -> Opened:
        """Open each blob and start its read; a blob that cannot be opened gives its error."""
        out: Opened = []
        for digest in digests:
            try:
                out.append((digest, self._open_blob(digest)))
            except StoreError as exc:
                out.append((digest, exc))
        return out

    def _open_blob(self, digest: str) -> int:
        """A read-only fd of a blob (pending or durable) whose read has been started."""
        check_digest(digest)
        with self._mutex:
            tmp = self._pending.get(digest)
        try:
            try:
                fd = os.open(tmp or self._blob_name(digest), _OPEN_READ)
            except FileNotFoundError:
                if not tmp:  # not pending: missing
                    raise
                fd = os.open(self._blob_name(digest), _OPEN_READ)  # flushed meanwhile
        except FileNotFoundError:
            raise ObjectMissing(f"object {digest} is missing from the store {self.url}") from None
        except OSError as exc:
            raise StoreError(f"cannot read object {digest}: {exc.strerror}") from exc
        with suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return fd

    def has_blob(self, digest: str) -> bool:
        with self._mutex:
            if digest in self._pending:
                return True
        return os.path.exists(self._blob_name(digest))

    def delete_blobs(self, digests: list[str]) -> int:
        freed = 0
        for digest in digests:
            path = self._blob_path(check_digest(digest))
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        return freed

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        objects = self.root / "objects"
        for sub in sorted(os.listdir(objects)):
            subdir = objects / sub
            try:
                with os.scandir(subdir) as it:
                    for e in it:
                        yield e.name, e.stat().st_size
            except NotADirectoryError:
                continue

    def iter_blob_times(self) -> Iterator[tuple[str, int, float | None]]:
        objects = self.root / "objects"
        for sub in sorted(os.listdir(objects)):
            try:
                with os.scandir(objects / sub) as it:
                    for e in it:
                        st = e.stat()
                        yield e.name, st.st_size, st.st_mtime
            except NotADirectoryError:
                continue

    def blob_path(self, digest: str) -> Path:
        """Path of a durable blob (for tools that read or damage it directly)."""
        return self._blob_path(check_digest(digest))

    def flush(self) -> None:
        with self._mutex:
            pending, self._pending = self._pending, {}
            self._pending_bytes = 0
            if not pending:
                self._drop_writer_dir()
                return
            try:
                syncfs(self._tmp)
                dirs: set[str] = set()
                for digest, tmp in pending.items():
                    if digest[:2] not in dirs:
                        with suppress(FileExistsError):
                            os.mkdir(f"{self._objects}/{digest[:2]}", DIR_MODE)
                        dirs.add(digest[:2])
                    os.rename(tmp, self._blob_name(digest))
                syncfs(self._tmp)
            except OSError as exc:
                for tmp in pending.values():
                    _unlink_quiet(tmp)
                raise _store_error(exc, "objects") from exc
            self._drop_writer_dir()

    # -- docs --------------------------------------------------------------
    def _doc_path(self, name: str) -> Path:
        return self.root / "docs" / check_doc_name(name)

    def put_doc(self, name: str, data: bytes) -> None:
        try:
            write_atomic(self._doc_path(name), data, self._tmp)
        except OSError as exc:
            raise _store_error(exc, f"document {name}") from exc

    def create_doc(self, name: str, data: bytes) -> bool:
        """Written to a temp file and hard-linked into place: link(2) fails if the name exists."""
        path = self._doc_path(name)
        tmp = ""
        try:
            tmp = _durable_temp(data, self._tmp)
            path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        except OSError as exc:
            raise _store_error(exc, f"document {name}") from exc
        finally:
            if tmp:
                _unlink_quiet(tmp)
        fsync_dir(path.parent)
        return True

    def holds_data(self) -> bool:
        for sub in ("objects", "docs"):
            with os.scandir(self.root / sub) as entries:
                if any(True for _ in entries):
                    return True
        return False

    def get_doc(self, name: str) -> bytes:
        try:
            return self._doc_path(name).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"document {name} is missing from the store {self.url}") from None

    def delete_doc(self, name: str) -> None:
        path = self._doc_path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def list_docs(self, prefix: str) -> list[str]:
        base = self.root / "docs"
        folder = base / prefix.rstrip("/") if prefix else base
        if not folder.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(folder):
            rel = Path(dirpath).relative_to(base)
            out.extend(str(rel / f) if str(rel) != "." else f for f in files)
        return sorted(out)

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
            if doc.get("host") == here and not _pid_alive(pid):
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
        return self.root / "cache"

    def clean_tmp(self) -> int:
        """Remove temp files left by killed writers; return how many were removed.

        Only safe under the exclusive lock (no writer is running).
        """
        n = 0
        with self._mutex, os.scandir(self._tmp) as entries:
            found = [e for e in entries if e.path != self._writer_dir]  # not our own
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                n += sum(len(files) for _, _, files in os.walk(entry.path)) + 1
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _unlink_quiet(entry.path)
                n += 1
        return n

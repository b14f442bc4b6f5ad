"""Restoring a snapshot's entries into a directory, with every attribute.

File content goes into a temp name in the target directory and is renamed into
place only when every chunk was read and verified, so a damaged chunk never
leaves wrong bytes under a file's name. All-zero chunks become holes, so sparse
files stay sparse. Directory attributes are applied last, deepest first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerfs.errors import StoreError
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore
from volplugin.backup.errors import RestoreError

_NODE_TYPES = {Kind.CHAR: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK, Kind.SOCKET: stat.S_IFSOCK}


@dataclass
class RestoreResult:
    """What a restore wrote."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    failed: list[str] = field(default_factory=list)


def select_entries(entries: list[Entry], subpath: str | None) -> list[Entry]:
    """The entries under ``subpath`` (and its parent directories), or all of them."""
    if not subpath:
        return entries
    sub = subpath.strip("/")
    parents = set()
    parts = sub.split("/")
    for i in range(len(parts)):
        parents.add("/".join(parts[:i]))
    chosen = [
        e
        for e in entries
        if e.path == sub
        or e.path.startswith(sub + "/")
        or (e.path in parents and e.kind is Kind.DIR)
    ]
    if not any(e.path == sub for e in chosen):
        raise RestoreError(
            f"the backup has no path {subpath!r}: see `volplugin diff` or restore all"
        )
    return chosen


def check_target(target: Path, force: bool) -> None:
    """Refuse a target that exists and is not an empty directory, unless forced."""
    if not target.exists():
        return
    if not target.is_dir():
        raise RestoreError(f"restore target {target} exists and is not a directory")
    if not force and any(target.iterdir()):
        raise RestoreError(
            f"restore target {target} is not empty: restore into an empty volume or pass --force"
        )


class Restorer:
    """Writes selected entries under a target directory; see the module docstring."""

    def __init__(self, store: ChunkStore, target: Path, all_entries: list[Entry]) -> None:
        self.store = store
        self.target = Path(target)
        self.by_path = {e.path: e for e in all_entries}
        self.result = RestoreResult()
        self._restored: set[str] = set()
        self._is_root = os.geteuid() == 0

    def _dest(self, path: str) -> str:
        return str(self.target / path) if path else str(self.target)

    def run(self, entries: list[Entry]) -> RestoreResult:
        self.target.mkdir(parents=True, exist_ok=True)
        dirs: list[Entry] = []
        current = ""
        try:
            for entry in entries:
                current = entry.path or "/"
                if entry.kind is Kind.DIR:
                    self._make_dir(entry)
                    dirs.append(entry)
                elif entry.kind in (Kind.WHITEOUT, Kind.OPAQUE):
                    continue
                else:
                    self._make_node(entry)
                self.result.entries += 1
            for entry in reversed(dirs):
                self._attributes(self._dest(entry.path), entry)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RestoreError(
                    f"no space left on the device of {self.target} while restoring "
                    f"{current}: free space or restore elsewhere "
                    f"({self.result.files} files were restored completely)"
                ) from exc
            raise RestoreError(f"restore into {self.target} failed: {exc}") from exc
        if self.result.failed:
            shown = ", ".join(self.result.failed[:5])
            more = len(self.result.failed) - 5
            raise RestoreError(
                f"{len(self.result.failed)} file(s) could not be restored because their data is "
                f"damaged or missing in the store: {shown}{f' and {more} more' if more > 0 else ''}"
                "; they were not written. Run `volplugin verify --read-data`"
            )
        return self.result

    # -- nodes ---------------------------------------------------------------------------
    def _clear(self, dest: str, keep_dir: bool) -> None:
        """Remove whatever a forced restore finds where an entry goes."""
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            shutil.rmtree(dest)
        else:
            os.unlink(dest)

    def _make_dir(self, entry: Entry) -> None:
        dest = self._dest(entry.path)
        if entry.path:
            self._clear(dest, keep_dir=True)
            os.makedirs(dest, mode=0o700, exist_ok=True)
        self._restored.add(entry.path)

    def _temp_name(self, entry: Entry) -> str:
        parent = self._dest(entry.parent)
        return os.path.join(parent, f".bk-restore-{secrets.token_hex(6)}")

    def _make_node(self, entry: Entry) -> None:
        dest = self._dest(entry.path)
        if entry.kind is Kind.HARDLINK:
            if entry.target in self._restored:
                self._clear(dest, keep_dir=False)
                os.link(self._dest(entry.target), dest)
                self._restored.add(entry.path)
                return
            source = self.by_path.get(entry.target)
            if source is None or source.kind is not Kind.FILE:
                self.result.failed.append(f"{entry.path} (link target {entry.target} is missing)")
                return
            entry = replace(
                entry,
                kind=Kind.FILE,
                target="",
                chunks=source.chunks,
                inline=source.inline,
                size=source.size,
            )
        tmp = self._temp_name(entry)
        try:
            if entry.kind is Kind.FILE:
                if not self._write_file(tmp, entry):
                    return
                self.result.files += 1
            elif entry.kind is Kind.SYMLINK:
                os.symlink(entry.target, tmp)
            elif entry.kind is Kind.FIFO:
                os.mkfifo(tmp, 0o600)
            else:
                os.mknod(tmp, _NODE_TYPES[entry.kind] | 0o600, os.makedev(*entry.rdev))
            self._attributes(tmp, entry)
            self._clear(dest, keep_dir=False)
            os.rename(tmp, dest)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        self._restored.add(entry.path)

    def _write_file(self, tmp: str, entry: Entry) -> bool:
        """Write verified content to ``tmp``; False (and no file) if the data is damaged."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if entry.inline is not None:
                _write_all(fd, entry.inline)
            else:
                pos = 0
                zero = b""
                for ref in entry.chunks:
                    data = self.store.get_chunk(ref.digest)
                    if len(data) != ref.size:
                        raise StoreError(f"object {ref.digest} has the wrong length")
                    if len(zero) != len(data):
                        zero = bytes(len(data))
                    if data != zero:
                        os.lseek(fd, pos, os.SEEK_SET)
                        _write_all(fd, data)
                    pos += len(data)
                os.ftruncate(fd, pos)
                self.result.bytes += pos
        except StoreError as exc:
            os.close(fd)
            _unlink_quiet(tmp)
            self.result.failed.append(f"{entry.path} ({exc})")
            return False
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        return True

    def _attributes(self, dest: str, entry: Entry) -> None:
        """Owner, mode, xattrs and mtime, in the order that keeps setuid bits and caps."""
        try:
            os.lchown(dest, entry.uid, entry.gid)
        except PermissionError:
            if self._is_root:
                raise
        if entry.kind is not Kind.SYMLINK:
            os.chmod(dest, entry.mode & 0o7777)
        for name, value in entry.xattrs.items():
            try:
                os.setxattr(dest, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
        os.utime(dest, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""Merging the changes made through a lazy volume's mount onto its filled directory.

A lazy volume's mount is a kernel overlay: the kernel kept every change in an
upper tree in overlayfs' own format (read by layerfs.union.upper). Once the fill
has restored the whole backup (exactly: it is the mount's lower tree) and the
mount is gone, the upper tree is applied onto the filled directory so that the
volume holds exactly what the mount showed:

* a whiteout deletes the filled entry of its name;
* a directory is merged with the filled one at its path: the filled children
  stay unless the upper holds an entry of the same name; an opaque directory
  (or one with no lower path) drops every filled child it does not hold;
* a renamed (redirected) directory takes the children of its origin in the
  filled tree (the origin itself is gone through the whiteout the rename left);
* a metacopy file gets the bytes of its lower file, the filled file at its
  origin (same path, or the redirect; its size is checked), with the upper
  file's mode, owner, mtime and xattrs;
* every other upper entry is hard-linked into place as it is; directory
  attributes are the upper ones, set after their children.
overlayfs' private xattrs (``trusted.overlay.*``) never reach the volume.

Two phases, so that a merge killed at any point (kill -9, power loss) can be
run again from the start and gives the same result; the caller keeps ``stage``
(a directory on the filled directory's filesystem) until the merged directory
is in place, then removes it with the upper tree.

1. *Stage* (no name in the filled directory changes): every renamed directory gets
   a copy of its origin in ``stage`` (directories recreated, everything else
   hard-linked), every metacopy file its bytes and attributes there: the filled
   file itself, given the upper file's attributes, when the backup gives it no other
   name (the mount showed its bytes only through the metacopy file), else a copy.
   Then ``syncfs`` and a ``ready`` marker. A run that finds no marker empties
   ``stage`` and stages again (the same files are reused: their link counts are
   back to one, and only their bytes are read).
2. *Apply*, top down: whiteouts remove, staged directories are renamed into
   place (one that is no longer in ``stage`` was placed by an earlier run),
   upper and staged files are linked in through a temp name in ``stage`` and
   ``rename(2)``; each step leaves what an earlier run did as it is. Then
   ``syncfs``: once ``merge_upper`` returns, the merged tree is on disk.

What changes outside the filled directory: ``stage``; and the upper tree only in
overlayfs' private xattrs of its plain non-directory entries (origin handles,
which say nothing the mount shows), dropped as they are linked into the volume.
Its directories, whiteouts, metacopy files and every redirect, opaque and
metacopy mark stay as the kernel wrote them, so a merge is always redone from
the same upper tree.

Containers wrote the upper tree (and the backup the filled tree), so both are
walked through directory descriptors and no symlink is ever followed
(layerfs.confined): a symlink is linked into place as a symlink, a filled entry
that is not a directory where one is expected is replaced, and an upper
directory that is not the one read when it is opened is reported and skipped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from layerfs import confined
from layerfs.confined import Attributes, Escape, apply_fd, lstat_at, proc_path, remove_at
from layerfs.errors import LayerfsError
from layerfs.union.upper import UpperDir, UpperEntry, UpperKind, open_upper, walk
from layerfs.union.vocab import is_private_xattr

log = logging.getLogger("volplugin.lazy.volumes")

READY = "ready"  # in the stage: staging is complete and synced
TMP = "tmp"  # in the stage: temp names of entries being linked into place
PIECE = 1 << 20
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class MergeError(LayerfsError):
    """The changes made through a lazy mount cannot be merged onto its filled directory."""


def merge_upper(upper: Path, target: Path, stage: Path) -> int:
    """Apply the overlayfs upper tree ``upper`` onto ``target`` (which holds the mount's
    lower tree) and sync; return the upper entries applied. ``stage`` keeps the merge's
    own state (see the module docstring)."""
    stage.mkdir(mode=0o700, exist_ok=True)
    with contextlib.ExitStack() as held:
        up = held.enter_context(open_upper(upper))
        dst = confined.open_root(target)
        held.callback(os.close, dst)
        stage_fd = confined.open_root(stage)
        held.callback(os.close, stage_fd)
        devices = {os.fstat(fd).st_dev for fd in (up.fd, dst, stage_fd)}
        if len(devices) != 1:
            raise MergeError(
                f"the upper tree {upper}, the filled directory {target} and {stage} must be "
                "on one filesystem (the merge links files between them)"
            )
        merger = _Merger(up, dst, stage_fd, f"the filled directory {target}")
        if not merger.ready():
            merger.clear_stage()
            merger.stage_all()
            confined.syncfs(stage_fd)
            merger.mark_ready()
        merger.apply_all()
        confined.syncfs(dst)
        return merger.applied


class _Merger:
    def __init__(self, up: UpperDir, dst: int, stage: int, label: str) -> None:
        self.up = up
        self.dst = dst
        self.stage = stage
        self.label = label
        self.applied = 0
        self.skipped: list[str] = []
        self._tmp = -1
        self._serial = 0

    # -- the stage -----------------------------------------------------------------------

    def ready(self) -> bool:
        st = lstat_at(self.stage, READY)
        return st is not None and stat.S_ISREG(st.st_mode)

    def mark_ready(self) -> None:
        fd = os.open(READY, _NEW_FILE, 0o600, dir_fd=self.stage)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(self.stage)

    def clear_stage(self) -> None:
        for name in os.listdir(self.stage):
            remove_at(self.stage, name)

    # -- phase 1: stage what the filled tree gives -----------------------------------------

    def stage_all(self) -> None:
        moved: list[UpperEntry] = []
        staged: set[str] = set()
        for updir, entry in walk(self.up):
            if entry.kind is UpperKind.DIRECTORY and entry.moved:
                moved.append(entry)
            elif entry.kind is UpperKind.METACOPY:
                key = _file_key(entry)
                if key not in staged:  # one upper inode, however many names it has
                    self._stage_file(updir, entry, key)
                    staged.add(key)
        # after the files: a filled file's link count must not count the copies' links
        for entry in moved:
            self._stage_dir(entry)

    def _stage_file(self, updir: UpperDir, entry: UpperEntry, key: str) -> None:
        """Stage a metacopy file: its lower file's bytes with its own attributes."""
        src = self._lower_file(entry)
        try:
            st = os.fstat(src)
            if st.st_size != entry.st.st_size:
                raise MergeError(
                    f"{entry.path!r} shows the bytes of {entry.lower!r} of the backup "
                    f"({entry.st.st_size} bytes), but {self.label} holds {st.st_size} bytes "
                    "there: the fill did not restore the backup exactly"
                )
            attrs = Attributes(
                entry.st.st_uid,
                entry.st.st_gid,
                stat.S_IMODE(entry.st.st_mode),
                entry.st.st_mtime_ns,
                updir.xattrs(entry),
            )
            if st.st_nlink == 1:  # no other name in the backup: the mount hid this one
                os.link(proc_path(src), key, dst_dir_fd=self.stage, follow_symlinks=True)
                _set_attributes(src, attrs)
                return
            out = os.open(key, _NEW_FILE, 0o600, dir_fd=self.stage)
            try:
                _copy_data(src, out, st.st_size)
                _set_attributes(out, attrs)
            finally:
                os.close(out)
        finally:
            os.close(src)

    def _lower_file(self, entry: UpperEntry) -> int:
        """A read descriptor of the filled file a metacopy file takes its bytes from."""
        if entry.lower is None:
            raise MergeError(
                f"{entry.path!r} of the upper tree is a metacopy file without a lower file: "
                "overlayfs cannot show its bytes either"
            )
        parent, name = confined.split(entry.lower)
        try:
            pfd = confined.open_dir(self.dst, parent, label=self.label)
            try:
                return confined.open_file_at(pfd, name)
            finally:
                os.close(pfd)
        except (Escape, FileNotFoundError) as exc:
            raise MergeError(
                f"{entry.path!r} shows the bytes of {entry.lower!r} of the backup, which "
                f"{self.label} does not hold as a regular file ({exc.strerror})"
            ) from None

    def _stage_dir(self, entry: UpperEntry) -> None:
        """Stage a renamed directory: a copy of its origin, files hard-linked."""
        key = _dir_key(entry)
        assert entry.lower is not None
        try:
            src = confined.open_dir(self.dst, entry.lower, label=self.label)
        except (Escape, FileNotFoundError) as exc:
            log.warning(
                "lazy merge: %r was renamed from %r, which %s does not hold as a directory "
                "(%s): its lower children are none",
                entry.path,
                entry.lower,
                self.label,
                exc.strerror,
            )
            os.mkdir(key, 0o700, dir_fd=self.stage)
            return
        try:
            _link_tree(src, self.stage, key, self.label)
        finally:
            os.close(src)

    # -- phase 2: apply the upper tree ---------------------------------------------------

    def apply_all(self) -> None:
        remove_at(self.stage, TMP)
        os.mkdir(TMP, 0o700, dir_fd=self.stage)
        self._tmp = confined.open_dir(self.stage, TMP)
        stack: list[tuple[UpperDir, int, Iterator[UpperEntry]]] = [
            (self.up, self.dst, iter(self.up.entries()))
        ]
        try:
            while stack:
                updir, dstfd, pending = stack[-1]
                entry = next(pending, None)
                if entry is None:
                    _copy_dir_attributes(updir, dstfd)
                    self.applied += 1
                    stack.pop()
                    if updir is not self.up:
                        updir.close()
                        os.close(dstfd)
                    continue
                if entry.kind is UpperKind.DIRECTORY:
                    entered = self._enter(updir, dstfd, entry)
                    if entered is not None:
                        sub_up, sub_dst, entries = entered
                        stack.append((sub_up, sub_dst, iter(entries)))
                else:
                    self._apply(updir, dstfd, entry)
                    self.applied += 1
        finally:
            for updir, dstfd, _pending in stack:
                if updir is not self.up:
                    updir.close()
                    os.close(dstfd)
            os.close(self._tmp)
            self._tmp = -1

    def _enter(
        self, updir: UpperDir, dstfd: int, entry: UpperEntry
    ) -> tuple[UpperDir, int, list[UpperEntry]] | None:
        """Make the filled directory at ``entry``'s path the one to apply its children on."""
        name = entry.name
        if entry.moved:
            key = _dir_key(entry)
            if lstat_at(self.stage, key) is not None:  # else placed by an earlier run
                remove_at(dstfd, name)
                os.rename(key, name, src_dir_fd=self.stage, dst_dir_fd=dstfd)
        there = lstat_at(dstfd, name)
        if there is None or not stat.S_ISDIR(there.st_mode):
            remove_at(dstfd, name)  # a file, or a symlink: never followed, replaced
            os.mkdir(name, 0o700, dir_fd=dstfd)
        try:
            sub_up = updir.open(entry)
        except (Escape, FileNotFoundError) as exc:
            self._skip(entry.path, str(exc))
            return None
        try:
            sub_dst = confined.open_dir(dstfd, name, label=self.label)
        except (Escape, FileNotFoundError) as exc:
            sub_up.close()
            self._skip(entry.path, str(exc))
            return None
        entries = sub_up.entries()
        if entry.lower is None:  # opaque or new: no filled child shows through it
            keep = {e.name for e in entries}
            for child in os.listdir(sub_dst):
                if child not in keep:
                    remove_at(sub_dst, child)
        return sub_up, sub_dst, entries

    def _apply(self, updir: UpperDir, dstfd: int, entry: UpperEntry) -> None:
        name = entry.name
        if entry.kind is UpperKind.WHITEOUT:
            remove_at(dstfd, name)
            return
        if entry.kind is UpperKind.METACOPY:
            key = _file_key(entry)
            staged = lstat_at(self.stage, key)
            if staged is None:
                raise MergeError(
                    f"the staged copy of {entry.path!r} is missing from the merge's state: "
                    "something removed files from it during the merge"
                )
            if not _same_inode(dstfd, name, staged):
                self._place(dstfd, name, self.stage, key, staged)
            return
        _strip_private(updir.fd, name)
        if not _same_inode(dstfd, name, entry.st):  # else linked by an earlier run
            self._place(dstfd, name, updir.fd, name, entry.st)

    def _place(self, dstfd: int, name: str, srcfd: int, src: str, want: os.stat_result) -> None:
        """Hard-link ``src`` of ``srcfd`` to a temp name, then rename it over ``name``."""
        tmp = str(self._serial)
        self._serial += 1
        os.link(src, tmp, src_dir_fd=srcfd, dst_dir_fd=self._tmp, follow_symlinks=False)
        try:
            if not _same_inode(self._tmp, tmp, want):
                raise Escape(errno.ESTALE, f"{src!r} was replaced during the merge")
            there = lstat_at(dstfd, name)
            if there is not None and stat.S_ISDIR(there.st_mode):
                remove_at(dstfd, name)
            os.rename(tmp, name, src_dir_fd=self._tmp, dst_dir_fd=dstfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=self._tmp)
            raise

    def _skip(self, rel: str, why: str) -> None:
        log.warning("lazy merge: skipping %r: %s", rel, why)
        self.skipped.append(rel)


def _file_key(entry: UpperEntry) -> str:
    return f"f{entry.st.st_ino}"


def _dir_key(entry: UpperEntry) -> str:
    return f"d{entry.st.st_ino}"


def _same_inode(dirfd: int, name: str, st: os.stat_result) -> bool:
    other = lstat_at(dirfd, name)
    return other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _link_tree(src_root: int, parent: int, name: str, label: str) -> None:
    """Recreate the directory ``src_root`` as ``name`` in ``parent``: directories made
    with their attributes, every other entry hard-linked (nothing followed)."""
    os.mkdir(name, 0o700, dir_fd=parent)
    stack = [(os.dup(src_root), confined.open_dir(parent, name), iter(_sorted(src_root)))]
    try:
        while stack:
            src, dst, names = stack[-1]
            child = next(names, None)
            if child is None:
                _copy_attributes(src, dst, _public_xattrs(src))
                stack.pop()
                os.close(src)
                os.close(dst)
                continue
            st = lstat_at(src, child)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.link(child, child, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
                continue
            sub_src = confined.open_dir(src, child, label=label)
            try:
                os.mkdir(child, 0o700, dir_fd=dst)
                sub_dst = confined.open_dir(dst, child)
            except BaseException:
                os.close(sub_src)
                raise
            stack.append((sub_src, sub_dst, iter(_sorted(sub_src))))
    finally:
        for src, dst, _names in stack:
            os.close(src)
            os.close(dst)


def _sorted(dirfd: int) -> list[str]:
    return sorted(os.listdir(dirfd), key=os.fsencode)


def _copy_data(src: int, out: int, size: int) -> None:
    """Copy ``size`` bytes of ``src`` to ``out``, leaving holes as holes."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        _copy_range(src, out, start, end)
        pos = end
    os.ftruncate(out, size)


def _copy_range(src: int, out: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            done = os.copy_file_range(src, out, end - pos, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = 0
        if done == 0:  # no in-kernel copy here (or the file shrank): read and write
            data = os.pread(src, min(PIECE, end - pos), pos)
            if not data:
                return
            os.pwrite(out, data, pos)
            done = len(data)
        pos += done


def _public_xattrs(fd: int) -> dict[str, bytes]:
    found = confined.read_xattrs(fd, fd, ".")
    return {k: v for k, v in found.items() if not is_private_xattr(k)}


def _set_attributes(fd: int, attrs: Attributes) -> None:
    """Owner, mode, exactly ``attrs.xattrs`` and mtime on the open ``fd``."""
    for key in set(confined.read_xattrs(fd, fd, ".")) - set(attrs.xattrs):
        os.removexattr(fd, key)
    apply_fd(fd, attrs, owner_required=True)


def _copy_attributes(src: int, dst: int, xattrs: dict[str, bytes]) -> None:
    st = os.fstat(src)
    _set_attributes(
        dst, Attributes(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns, xattrs)
    )


def _copy_dir_attributes(updir: UpperDir, dstfd: int) -> None:
    """The upper directory's attributes (its public xattrs only) onto the filled one."""
    _copy_attributes(updir.fd, dstfd, updir.xattrs())


def _strip_private(dirfd: int, name: str) -> None:
    """Drop overlayfs' (and layerfs') private xattrs of an upper non-directory entry."""
    target = proc_path(dirfd, name)
    try:
        names = os.listxattr(target, follow_symlinks=False)
    except OSError:
        return
    for key in names:
        if is_private_xattr(key):
            with contextlib.suppress(OSError):
                os.removexattr(target, key, follow_symlinks=False)

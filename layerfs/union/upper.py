"""Reading an overlayfs upper directory: what each entry is, and which lower entry it stands on.

The kernel keeps every change of a writable overlay mount in its upper
directory (the names are in layerfs.union.vocab):

* a character device 0/0 is a *whiteout*: the lower entry of its name is gone;
* a directory is merged with the lower directory at its *lower path*, whose
  children show through it unless the upper holds an entry of the same name.
  With ``trusted.overlay.opaque`` = ``y`` it is *opaque*: no lower child
  shows. With ``trusted.overlay.redirect`` it was *renamed*: its lower path is
  the redirect, absolute from the root (``/a/b``) or relative to the lower
  path of its parent (a single name); the old name got a whiteout. The kernel
  ignores the redirect of an opaque directory;
* a regular file with ``trusted.overlay.metacopy`` is a *metacopy* file: its
  mode, owner, times and xattrs are its own, its bytes those of the lower file
  at its lower path (its redirect, read as for a directory, or its own name);
* anything else is *plain*: it shows as it is stored.

Without a redirect an entry's lower path is its parent's lower path plus its
name; below a directory without lower path (opaque, or new) only an absolute
redirect leads to the lower tree. ``trusted.overlay.origin`` and the kernel's
other private xattrs say nothing about what the mount shows and are left out.

An upper directory is written by containers through the mount, so it is read
through directory descriptors opened one no-follow component at a time
(layerfs.confined): an entry is classified from its own ``lstat``, its xattrs
are read without following a symlink, and a directory that is not the one
classified when it is opened raises ``Escape``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from layerfs import confined
from layerfs.confined import Escape, lstat_at, proc_path
from layerfs.errors import LayerfsError
from layerfs.formats.paths import BadPath, check_stored
from layerfs.union.vocab import (
    OPAQUE_VALUE,
    XATTR_METACOPY,
    XATTR_OPAQUE,
    XATTR_REDIRECT,
    is_private_xattr,
    is_whiteout_stat,
)


class UpperFormatError(LayerfsError):
    """An upper directory holds something overlayfs itself would refuse to show."""


class UpperKind(Enum):
    """What an entry of an overlayfs upper directory is (see the module docstring)."""

    WHITEOUT = "whiteout"
    DIRECTORY = "directory"
    METACOPY = "metacopy"
    PLAIN = "plain"


@dataclass(frozen=True, slots=True)
class UpperEntry:
    """One entry of an upper directory, classified."""

    name: str
    path: str  # in the merged tree, '/'-separated, no leading '/'
    kind: UpperKind
    st: os.stat_result  # its own lstat
    opaque: bool = False  # DIRECTORY: trusted.overlay.opaque=y
    redirect: str | None = None  # DIRECTORY, METACOPY: trusted.overlay.redirect as stored
    # DIRECTORY: the lower directory whose children show through (None: none do);
    # METACOPY: the lower file holding its bytes (None: there is none to find)
    lower: str | None = None
    # the lower path differs from the one its parent's lower path gives by name (a rename)
    moved: bool = False


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parse_redirect(value: bytes, where: str) -> str:
    """``trusted.overlay.redirect``'s value as text, checked as the kernel checks it:
    ``/`` and a stored path (absolute), or one name (relative)."""
    text = os.fsdecode(value)
    try:
        if text.startswith("/"):
            if text == "/" or check_stored(text[1:]) != text[1:]:
                raise BadPath(f"{text!r} names no entry below the root")
        elif not text or "/" in text or text in (".", "..") or "\0" in text:
            raise BadPath(f"{text!r} is neither an absolute path nor one name")
    except BadPath as exc:
        raise UpperFormatError(
            f"{where} has a malformed {XATTR_REDIRECT} ({exc}): overlayfs cannot show it "
            "either; remove that entry from the upper directory"
        ) from None
    return text


def lower_path(parent_lower: str | None, name: str, redirect: str | None) -> str | None:
    """Where the kernel finds the lower entry of ``name`` (redirect already checked)."""
    if redirect is not None and redirect.startswith("/"):
        return redirect[1:]
    if parent_lower is None:
        return None
    return join(parent_lower, redirect if redirect is not None else name)


def _xattr(dirfd: int, name: str, key: str) -> bytes | None:
    """The xattr ``key`` of ``name`` in ``dirfd`` (never following a symlink), or None."""
    try:
        return os.getxattr(proc_path(dirfd, name), key, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT):
            return None
        raise


def classify(
    dirfd: int, name: str, parent_path: str, parent_lower: str | None
) -> UpperEntry | None:
    """The entry ``name`` of the upper directory ``dirfd``, or None if it is gone."""
    st = lstat_at(dirfd, name)
    if st is None:
        return None
    path = join(parent_path, name)
    if is_whiteout_stat(st):
        return UpperEntry(name, path, UpperKind.WHITEOUT, st)
    natural = join(parent_lower, name) if parent_lower is not None else None
    if stat.S_ISDIR(st.st_mode):
        raw = _xattr(dirfd, name, XATTR_REDIRECT)
        redirect = parse_redirect(raw, repr(path)) if raw is not None else None
        if _xattr(dirfd, name, XATTR_OPAQUE) == OPAQUE_VALUE:
            return UpperEntry(name, path, UpperKind.DIRECTORY, st, True, redirect)
        lower = lower_path(parent_lower, name, redirect)
        return UpperEntry(
            name, path, UpperKind.DIRECTORY, st, False, redirect, lower, lower != natural
        )
    if stat.S_ISREG(st.st_mode) and _xattr(dirfd, name, XATTR_METACOPY) is not None:
        raw = _xattr(dirfd, name, XATTR_REDIRECT)
        redirect = parse_redirect(raw, repr(path)) if raw is not None else None
        lower = lower_path(parent_lower, name, redirect)
        return UpperEntry(
            name, path, UpperKind.METACOPY, st, False, redirect, lower, lower != natural
        )
    return UpperEntry(name, path, UpperKind.PLAIN, st)


def _name_key(name: str) -> bytes:
    return os.fsencode(name)


class UpperDir:
    """An open directory of an upper tree: its descriptor, its path in the merged tree
    and the lower directory whose children show through it (None: none do).

    Owns its descriptor: ``close`` it, or use it as a context manager.
    """

    def __init__(self, fd: int, path: str, lower: str | None, label: str) -> None:
        self.fd = fd
        self.path = path
        self.lower = lower
        self.label = label

    def names(self) -> list[str]:
        """The names in this directory, sorted bytewise."""
        return sorted(os.listdir(self.fd), key=_name_key)

    def entries(self) -> list[UpperEntry]:
        """Every entry of this directory, classified, sorted bytewise by name."""
        out = []
        for name in self.names():
            entry = classify(self.fd, name, self.path, self.lower)
            if entry is not None:
                out.append(entry)
        return out

    def open(self, entry: UpperEntry) -> UpperDir:
        """The directory ``entry`` of this one; Escape if it is no longer that directory."""
        fd = confined.open_dir(self.fd, entry.name, label=self.label)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (entry.st.st_dev, entry.st.st_ino):
            os.close(fd)
            raise Escape(errno.ESTALE, f"{entry.path!r} in {self.label} was replaced meanwhile")
        return UpperDir(fd, entry.path, entry.lower, self.label)

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def xattrs(self, entry: UpperEntry | None = None) -> dict[str, bytes]:
        """The xattrs the mount shows on ``entry`` (on this directory itself if None):
        every one but overlayfs' and layerfs' private ones."""
        if entry is None:
            found = confined.read_xattrs(self.fd, self.fd, ".")
        else:
            found = confined.read_xattrs(None, self.fd, entry.name)
        return {k: v for k, v in found.items() if not is_private_xattr(k)}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> UpperDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_upper(path: str | os.PathLike, label: str | None = None) -> UpperDir:
    """The root of the upper directory at ``path``; its lower path is the lower root."""
    text = os.fspath(path)
    return UpperDir(confined.open_root(text), "", "", label or f"the upper directory {text}")


def walk(root: UpperDir) -> Iterator[tuple[UpperDir, UpperEntry]]:
    """Every entry below ``root``, depth first, a directory before its children, with the
    open directory holding it (valid until the next step). A directory that cannot be
    opened as the one classified (Escape) is yielded but not entered."""
    stack: list[tuple[UpperDir, Iterator[UpperEntry]]] = [(root, iter(root.entries()))]
    try:
        while stack:
            current, pending = stack[-1]
            entry = next(pending, None)
            if entry is None:
                stack.pop()
                if current is not root:
                    current.close()
                continue
            yield current, entry
            if entry.kind is UpperKind.DIRECTORY:
                try:
                    sub = current.open(entry)
                except (Escape, FileNotFoundError):
                    continue
                stack.append((sub, iter(sub.entries())))
    finally:
        for current, _pending in stack:
            if current is not root:
                current.close()


def read_upper(path: str | os.PathLike) -> list[UpperEntry]:
    """Every entry of the upper directory at ``path``, as ``walk`` gives them."""
    with open_upper(Path(path)) as root:
        return [entry for _dir, entry in walk(root)]

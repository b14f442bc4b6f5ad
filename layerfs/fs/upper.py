"""The upper directory of a writable mount: its on-disk format and the helpers that keep it.

Format (version 1). Tools such as ``layerfs commit``/``diff`` read exactly this.

Two layouts hold the same *upper tree*:

* image mode (``layerfs mount IMAGE MNT --upper DIR``): ``DIR/upper/`` is the
  upper tree, ``DIR/work/`` the workdir, and ``DIR/layerfs.json`` names the
  image the changes belong to: ``{"format": 1, "image": NAME, "image_id":
  "sha256:..."}``. Mounting DIR over another image is refused.
* overlay mode (``--upperdir U --workdir W``): ``U`` itself is the upper tree
  and ``W`` the workdir, as with kernel overlayfs; there is no layerfs.json.

In the upper tree:

* Files, directories, symlinks, devices, fifos and sockets are stored as
  themselves with their own mode, owner, times and xattrs. An entry present in
  the upper tree hides the lower entry at the same path; a directory present in
  both is merged (upper attributes win).
* A *whiteout* (deleted lower entry) is a character device 0/0 named like the
  entry it hides.
* An *opaque directory* has the xattr ``trusted.overlay.opaque`` = ``y``: no lower
  child of that path shows through it (a directory deleted and recreated, or a
  lower directory that was renamed, see below).
* A *metacopy* regular file (metadata-only copy-up) carries the xattr
  ``trusted.layerfs.metacopy`` whose value is JSON ``{"origin": PATH, "ranges":
  [[START, END], ...]}``: its size, mode, owner, times and xattrs are its own,
  but its bytes come from the lower file at ``origin`` (path relative to the
  lower root) except in the half-open byte ranges listed, which are
  materialized in the upper file. ``ranges`` is sorted and non-overlapping; the
  upper file is sparse outside them. Bytes past the end of the lower file read
  as zeros. When the ranges cover the whole file the xattr is removed and the
  file is an ordinary upper file. Image mode materializes whole store chunks
  on write; overlay mode copies the whole file on the first write, so its
  metacopy files always have ``ranges == []`` and additionally carry kernel
  overlayfs' ``trusted.overlay.metacopy`` (empty) and, when ``origin`` differs
  from the file's own path, ``trusted.overlay.redirect`` = ``/ORIGIN``: kernel
  overlayfs mounts such an upper with ``-o metacopy=on``.
* ``trusted.layerfs.ino`` (decimal text) on an entry copied up from a lower
  layer keeps the inode number it had there, so st_ino is stable across
  copy-up, rename and remount.
* Hardlinked lower files are copied up together: every lower name of the
  inode becomes a hard link of one upper inode.
* A renamed lower directory is copied up as a tree: every directory is
  recreated (opaque), every file becomes a metacopy file whose ``origin`` is
  its old path, and the old path gets a whiteout. No redirect xattrs are used
  for directories.
* ``trusted.layerfs.*`` and ``trusted.overlay.*`` xattrs are never shown
  through the mount (layerfs.union.vocab.is_private_xattr). Temporary files
  of copy-up live in ``WORKDIR/work/`` and are moved into place with
  rename(2), so a crash or full disk never leaves a half-copied entry in the
  tree.

The overlayfs names above (whiteouts, ``trusted.overlay.*``) are defined once,
in layerfs.union.vocab.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.errors import LayerfsError
from layerfs.treedir import TreeDir
from layerfs.union.vocab import (
    OPAQUE_VALUE,
    WHITEOUT_MODE,
    WHITEOUT_RDEV,
    XATTR_METACOPY,
    XATTR_OPAQUE,
    XATTR_REDIRECT,
)

FORMAT = 1
META_FILE = "layerfs.json"
X_METACOPY = "trusted.layerfs.metacopy"
X_INO = "trusted.layerfs.ino"


class UpperError(LayerfsError):
    """The upper directory cannot be used."""


@dataclass(frozen=True)
class UpperDirs:
    """Where a writable mount keeps its changes."""

    tree: Path  # the upper tree
    work: Path  # the workdir; temporary files go to work/work
    image: str | None = None
    image_id: str | None = None

    @property
    def tmp(self) -> Path:
        return self.work / "work"


def image_upper(base: Path, image: str, image_id: str, upper_format: int = FORMAT) -> UpperDirs:
    """Create or reopen the image-mode upper DIR for an image; refuse another image's DIR,
    and one whose upper tree has another format (``upper_format``: this module's
    FORMAT, or layerfs.fs.service's for kernel overlay uppers)."""
    base = Path(base).absolute()
    meta = base / META_FILE
    try:
        base.mkdir(parents=True, exist_ok=True)
        if meta.exists():
            doc = json.loads(meta.read_text())
            if doc.get("image_id") != image_id:
                raise UpperError(
                    f"upper directory {base} holds changes to image {doc.get('image')} "
                    f"({doc.get('image_id')}), not {image}: use another --upper directory"
                )
            if doc.get("format", FORMAT) != upper_format:
                raise UpperError(
                    f"upper directory {base} was written in upper format {doc.get('format')}, "
                    f"not {upper_format}: commit it with an older layerfs, or start a new "
                    "--upper directory"
                )
        else:
            doc = {"format": upper_format, "image": image, "image_id": image_id}
            tmp = base / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, meta)
        (base / "upper").mkdir(exist_ok=True)
        (base / "work").mkdir(exist_ok=True)
    except (OSError, ValueError) as exc:
        raise UpperError(f"cannot use {base} as upper directory: {exc}") from exc
    dirs = UpperDirs(base / "upper", base / "work", image, image_id)
    reset_tmp(dirs)
    return dirs


def overlay_upper(upperdir: Path, workdir: Path) -> UpperDirs:
    """The overlay-mode upper: the upper tree and workdir as given (both must exist)."""
    upperdir, workdir = Path(upperdir).absolute(), Path(workdir).absolute()
    for what, path in (("upperdir", upperdir), ("workdir", workdir)):
        if not path.is_dir():
            raise UpperError(f"{what} {path} is not a directory: create it first")
    if os.stat(upperdir).st_dev != os.stat(workdir).st_dev:
        raise UpperError(
            f"upperdir {upperdir} and workdir {workdir} must be on the same filesystem"
        )
    dirs = UpperDirs(upperdir, workdir)
    reset_tmp(dirs)
    return dirs


def reset_tmp(dirs: UpperDirs) -> None:
    """Empty WORKDIR/work (leftovers of a killed mount) and make sure it exists."""
    if dirs.tmp.exists():
        shutil.rmtree(dirs.tmp, ignore_errors=True)
    try:
        dirs.tmp.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UpperError(f"cannot create the workdir {dirs.tmp}: {exc.strerror}") from exc


# -- whiteouts and opaque directories ------------------------------------------------


def make_whiteout(path: str) -> None:
    os.mknod(path, WHITEOUT_MODE, WHITEOUT_RDEV)


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, XATTR_OPAQUE, follow_symlinks=False) == OPAQUE_VALUE
    except OSError:
        return False


def set_opaque(path: str) -> None:
    os.setxattr(path, XATTR_OPAQUE, OPAQUE_VALUE, follow_symlinks=False)


def make_whiteout_at(tree: TreeDir, rel: str) -> None:
    os.mknod(rel, WHITEOUT_MODE, WHITEOUT_RDEV, dir_fd=tree.fd)


def is_opaque_at(tree: TreeDir, rel: str) -> bool:
    try:
        return tree.xattr(os.getxattr, rel, XATTR_OPAQUE) == OPAQUE_VALUE
    except OSError:
        return False


def set_opaque_at(tree: TreeDir, rel: str) -> None:
    tree.xattr(os.setxattr, rel, XATTR_OPAQUE, OPAQUE_VALUE)


# -- metacopy files ---------------------------------------------------------------


@dataclass
class MetaCopy:
    """Where a metacopy file's bytes come from and which ranges the upper holds."""

    origin: str
    ranges: list[list[int]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps({"origin": self.origin, "ranges": self.ranges}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> MetaCopy:
        doc = json.loads(data)
        return cls(doc["origin"], [list(r) for r in doc.get("ranges", [])])

    def covers(self, start: int, end: int) -> bool:
        """Whether [start, end) lies inside one materialized range."""
        return any(a <= start and end <= b for a, b in self.ranges)

    def add(self, start: int, end: int) -> None:
        """Mark [start, end) materialized, merging neighbours."""
        out: list[list[int]] = []
        for a, b in sorted([*self.ranges, [start, end]]):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        self.ranges = out

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """Sub-ranges of [start, end) not materialized, in order."""
        out = []
        pos = start
        for a, b in self.ranges:
            if b <= pos:
                continue
            if a >= end:
                break
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end))
        return out


def read_metacopy(path_or_fd: str | int) -> MetaCopy | None:
    try:
        if isinstance(path_or_fd, int):
            data = os.getxattr(path_or_fd, X_METACOPY)
        else:
            data = os.getxattr(path_or_fd, X_METACOPY, follow_symlinks=False)
    except OSError:
        return None
    return MetaCopy.from_bytes(data)


def write_metacopy(fd: int, meta: MetaCopy) -> None:
    os.setxattr(fd, X_METACOPY, meta.to_bytes())


def clear_metacopy(path_or_fd: str | int) -> None:
    for name in (X_METACOPY, XATTR_METACOPY, XATTR_REDIRECT):
        with contextlib.suppress(OSError):
            os.removexattr(path_or_fd, name)


def read_metacopy_at(tree: TreeDir, rel: str) -> MetaCopy | None:
    try:
        data = tree.xattr(os.getxattr, rel, X_METACOPY)
    except OSError:
        return None
    return MetaCopy.from_bytes(data)


def read_ino_at(tree: TreeDir, rel: str) -> int | None:
    try:
        return int(tree.xattr(os.getxattr, rel, X_INO))
    except (OSError, ValueError):
        return None


def read_ino(path: str) -> int | None:
    try:
        return int(os.getxattr(path, X_INO, follow_symlinks=False))
    except (OSError, ValueError):
        return None

"""An image archive as named members: a directory (OCI layout) or a tar file.

Member names are archive-relative paths; a name that climbs out of the archive
(or a symlink in a directory layout that does) is refused.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path
from typing import BinaryIO, Protocol

from layerfs.errors import ImportRejected
from layerfs.formats.paths import BadPath, normalize


class Source(Protocol):
    """Read access to the members of an archive."""

    location: str

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> BinaryIO: ...

    def close(self) -> None: ...


def read_member(source: Source, name: str, limit: int = 64 << 20) -> bytes:
    """The whole content of a small member (a manifest, index or config)."""
    if not source.exists(name):
        raise ImportRejected(f"{source.location}: {name} is missing from the archive")
    if source.size(name) > limit:
        raise ImportRejected(f"{source.location}: {name} is implausibly large")
    with source.open(name) as f:
        try:
            return f.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImportRejected(
                f"{source.location}: {name} cannot be read ({exc}); the archive is damaged"
            ) from exc


def _member_name(location: str, name: str) -> str:
    try:
        clean = normalize(name)
    except BadPath as exc:
        raise ImportRejected(f"{location}: the archive refers to {name!r}: {exc}") from None
    if not clean:
        raise ImportRejected(f"{location}: the archive refers to an empty member name")
    return clean


class DirSource:
    """Members are files under a directory (an OCI image layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.location = str(root)

    def _path(self, name: str) -> Path:
        path = (self.root / _member_name(self.location, name)).resolve()
        if not path.is_relative_to(self.root):
            raise ImportRejected(f"{self.location}: {name!r} points outside the layout")
        return path

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")  # noqa: SIM115 - returned to the caller
        except OSError as exc:
            raise ImportRejected(f"{self.location}: cannot open {name}: {exc.strerror}") from exc

    def close(self) -> None:
        pass


class TarSource:
    """Members of a tar file (docker save output, an OCI archive)."""

    def __init__(self, path: Path) -> None:
        self.location = str(path)
        try:
            self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
                path, "r:*", encoding="utf-8", errors="surrogateescape"
            )
            self.members: dict[str, tarfile.TarInfo] = {}
            for m in self.tar.getmembers():
                try:
                    name = normalize(m.name)
                except BadPath:
                    continue  # never looked up; a name the manifest uses is checked itself
                if m.isfile() or m.issym() or m.islnk():
                    self.members[name] = m
        except (tarfile.TarError, EOFError, OSError) as exc:
            reason = "not a tar file" if isinstance(exc, tarfile.ReadError) else str(exc)
            raise ImportRejected(
                f"{path}: not a readable image archive ({reason}); expected `docker save` "
                "output, an OCI archive or an OCI layout directory"
            ) from exc

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self.members.get(_member_name(self.location, name))
        if member is None:
            raise ImportRejected(f"{self.location}: {name} is missing from the archive")
        return member

    def exists(self, name: str) -> bool:
        return _member_name(self.location, name) in self.members

    def size(self, name: str) -> int:
        member = self._member(name)
        for _ in range(16):  # follow links inside the archive, as extractfile does
            if member.isfile():
                return member.size
            base = posixpath.dirname(member.name) if member.issym() else ""
            target = posixpath.normpath(posixpath.join(base, member.linkname))
            found = self.members.get(target.lstrip("/"))
            if found is None:
                break
            member = found
        raise ImportRejected(f"{self.location}: {name} is a dangling link")

    def open(self, name: str) -> BinaryIO:
        try:
            f = self.tar.extractfile(self._member(name))
        except (KeyError, tarfile.TarError) as exc:
            raise ImportRejected(f"{self.location}: cannot open {name}: {exc}") from exc
        if f is None:
            raise ImportRejected(f"{self.location}: {name} is not a file")
        return f  # type: ignore[return-value]

    def close(self) -> None:
        self.tar.close()


def open_source(path: Path) -> Source:
    """Open an archive file or layout directory."""
    if path.is_dir():
        return DirSource(path)
    if not path.exists():
        raise ImportRejected(f"{path}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise ImportRejected(f"{path}: permission denied")
    return TarSource(path)

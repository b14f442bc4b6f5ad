"""Reading a real kernel overlayfs upper directory (layerfs.union.upper).

Each test mounts a kernel overlay over plain directories (``mount -t overlay``, with
the options of layerfs' image mounts), changes it through the mount, unmounts it and
reads what the kernel left in the upper directory.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from layerfs.confined import Escape
from layerfs.union.upper import (
    UpperEntry,
    UpperFormatError,
    UpperKind,
    lower_path,
    open_upper,
    parse_redirect,
    read_upper,
    walk,
)
from layerfs.union.vocab import XATTR_REDIRECT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount -t overlay needs root")

OPTIONS = "metacopy=on,redirect_dir=on,xino=on"


@contextmanager
def overlay(base: Path) -> Iterator[Path]:
    """A kernel overlay of base/lower (created by the caller) writable into base/upper."""
    for name in ("upper", "work", "mnt"):
        (base / name).mkdir(exist_ok=True)
    options = f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work,{OPTIONS}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(base / "mnt")],
        check=True,
        capture_output=True,
    )
    try:
        yield base / "mnt"
    finally:
        subprocess.run(["umount", str(base / "mnt")], check=True)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    lower = tmp_path / "lower"
    for d in ("a/b", "p/q/r", "dir", "old/deep", "gone/sub"):
        (lower / d).mkdir(parents=True)
    (lower / "f1").write_text("hello\n")
    (lower / "big").write_bytes(os.urandom(1 << 20))
    (lower / "a/b/c").write_text("c\n")
    (lower / "a/zz").write_text("zz\n")
    (lower / "p/q/r/g").write_text("g\n")
    (lower / "p/w").write_text("w\n")
    (lower / "dir/x").write_text("x\n")
    (lower / "old/deep/y").write_text("y\n")
    (lower / "gone/sub/z").write_text("z\n")
    os.symlink("f1", lower / "sym")
    return tmp_path


def _by_path(entries: list[UpperEntry]) -> dict[str, UpperEntry]:
    return {e.path: e for e in entries}


def test_every_kind_of_entry_and_its_lower_path(base: Path) -> None:
    with overlay(base) as m:
        os.unlink(m / "f1")  # a whiteout
        os.chmod(m / "big", 0o600)  # a metacopy file at its own path
        os.setxattr(m / "big", "user.tag", b"t")
        os.rename(m / "p/q/r", m / "rr")  # a directory moved to another parent
        os.rename(m / "p", m / "s")  # a directory renamed in its parent
        os.chmod(m / "rr/g", 0o700)  # a metacopy file below a moved directory
        os.mkdir(m / "new")  # a new directory, and a directory moved into it
        os.rename(m / "a/b", m / "new/b2")
        os.rename(m / "a/zz", m / "new/zz")  # a lower file moved: metacopy and redirect
        os.link(m / "new/zz", m / "new/zz2")
        os.rename(m / "dir", m / "dir2")
        os.symlink("/somewhere", m / "dir")  # a symlink where a directory was
        subprocess.run(["rm", "-r", str(m / "gone")], check=True)
        os.mkdir(m / "gone")  # opaque: deleted and made again
        (m / "gone/new").write_text("new\n")
        os.chown(m / "sym", 7, 7, follow_symlinks=False)  # a symlink copied up
        (m / "added").write_text("added\n")
    entries = read_upper(base / "upper")
    found = _by_path(entries)
    assert sorted(found) == sorted(
        [
            *("a", "a/b", "a/zz", "added", "big", "dir", "dir2", "f1", "gone", "gone/new"),
            *("new", "new/b2", "new/zz", "new/zz2", "p", "rr", "rr/g", "s", "s/q", "s/q/r"),
            "sym",
        ]
    )
    kinds = {path: e.kind for path, e in found.items()}
    for path in ("f1", "p", "a/b", "a/zz", "s/q/r"):
        assert kinds[path] is UpperKind.WHITEOUT, path
    for path in ("added", "dir", "gone/new", "sym"):
        assert kinds[path] is UpperKind.PLAIN, path
    for path in ("big", "rr/g", "new/zz", "new/zz2"):
        assert kinds[path] is UpperKind.METACOPY, path

    def lower(path: str) -> tuple[str | None, bool]:
        return found[path].lower, found[path].moved

    assert lower("big") == ("big", False)
    assert lower("s") == ("p", True) and found["s"].redirect == "p"  # relative
    assert lower("s/q") == ("p/q", False)  # merged below its renamed parent
    assert lower("rr") == ("p/q/r", True) and found["rr"].redirect == "/p/q/r"  # absolute
    assert lower("rr/g") == ("p/q/r/g", False)
    assert lower("dir2") == ("dir", True)
    assert lower("new") == (None, False) and found["new"].opaque
    assert lower("new/b2") == ("a/b", True)  # absolute, below a directory with no lower
    assert lower("new/zz") == lower("new/zz2") == ("a/zz", True)
    assert found["new/zz"].st.st_ino == found["new/zz2"].st.st_ino
    assert lower("gone") == (None, False) and found["gone"].opaque
    assert lower("a") == ("a", False) and not found["a"].opaque
    # a directory before its children, names sorted
    paths = [e.path for e in entries]
    assert paths.index("s") < paths.index("s/q") < paths.index("s/q/r")
    assert [p for p in paths if "/" not in p] == sorted(p for p in paths if "/" not in p)


def test_xattrs_leave_out_the_private_ones(base: Path) -> None:
    with overlay(base) as m:
        os.chmod(m / "big", 0o600)
        os.setxattr(m / "big", "user.tag", b"t")
        os.rename(m / "dir", m / "dir2")
        os.setxattr(m / "dir2", "user.d", b"d")
    with open_upper(base / "upper") as root:
        assert "trusted.overlay.impure" not in root.xattrs()
        entries = _by_path(root.entries())
        assert root.xattrs(entries["big"]) == {"user.tag": b"t"}
        assert root.xattrs(entries["dir2"]) == {"user.d": b"d"}
        assert "trusted.overlay.metacopy" in os.listxattr(base / "upper/big")


def test_a_file_written_after_a_rename_is_plain(base: Path) -> None:
    """The kernel leaves the redirect of a renamed file whose bytes it copied up later."""
    with overlay(base) as m:
        os.rename(m / "f1", m / "f2")
        with open(m / "f2", "a") as f:
            f.write("more\n")
    assert os.getxattr(base / "upper/f2", XATTR_REDIRECT) == b"f1"
    found = _by_path(read_upper(base / "upper"))
    assert found["f2"].kind is UpperKind.PLAIN
    assert found["f1"].kind is UpperKind.WHITEOUT


def test_a_directory_swapped_for_a_symlink_is_not_entered(base: Path, tmp_path: Path) -> None:
    with overlay(base) as m:
        (m / "dir/new").write_text("n\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s\n")
    with open_upper(base / "upper") as root:
        entry = _by_path(root.entries())["dir"]
        assert entry.kind is UpperKind.DIRECTORY
        os.rename(base / "upper/dir", base / "upper/dir.moved")
        os.symlink(outside, base / "upper/dir")
        with pytest.raises(Escape):
            root.open(entry)
        found = [e.path for _d, e in walk(root)]
    assert "dir/secret" not in found and "dir" in found


def test_a_malformed_redirect_is_refused(base: Path) -> None:
    with overlay(base) as m:
        os.rename(m / "dir", m / "dir2")
    os.setxattr(base / "upper/dir2", XATTR_REDIRECT, b"../../etc")
    with pytest.raises(UpperFormatError, match="malformed trusted.overlay.redirect"):
        read_upper(base / "upper")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"/a/b", "/a/b"), (b"name", "name"), (b".hidden", ".hidden")],
)
def test_parse_redirect(value: bytes, expected: str) -> None:
    assert parse_redirect(value, "x") == expected


@pytest.mark.parametrize("value", [b"/", b"a/b", b"..", b"/a/../b", b"", b"/a//b"])
def test_parse_redirect_refuses(value: bytes) -> None:
    with pytest.raises(UpperFormatError):
        parse_redirect(value, "x")


def test_lower_path() -> None:
    assert lower_path("", "a", None) == "a"
    assert lower_path("p", "a", None) == "p/a"
    assert lower_path("p", "a", "b") == "p/b"
    assert lower_path("p", "a", "/x/y") == "x/y"
    assert lower_path(None, "a", None) is None
    assert lower_path(None, "a", "b") is None
    assert lower_path(None, "a", "/x") == "x"

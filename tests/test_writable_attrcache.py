"""Writable mounts: attributes stay right across hard links, and create, getxattr and
setattr keep the union's rules."""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import pytest

from tests.support.writable import FILES

pytest_plugins = ["tests.support.writable_fixtures"]  # the `store` and `m` fixtures

# -- through real mounts ---------------------------------------------------------------------


def test_a_second_name_shows_the_files_changes_at_once(m):
    """Attributes of a file with one name are cached; a link drops them for the old name."""
    for first in (m.path / "fresh", m.path / "etc" / "hello"):
        if not first.exists():
            first.write_bytes(b"12345")
        size = os.stat(first).st_size
        assert os.stat(first).st_nlink == 1  # now cached by the kernel
        second = first.parent / (first.name + "-second")
        os.link(first, second)
        assert os.stat(first).st_nlink == 2
        assert os.stat(second).st_nlink == 2
        with open(second, "ab") as fh:
            fh.write(b"more")
        assert os.stat(first).st_size == size + 4
        os.chmod(second, 0o604)
        assert stat.S_IMODE(os.stat(first).st_mode) == 0o604
        os.unlink(second)
        assert os.stat(first).st_nlink == 1
        assert first.read_bytes().endswith(b"more")


def test_create_over_whiteouts_lower_entries_and_missing_parents(m):
    p = m.path
    with pytest.raises(FileExistsError):
        os.open(p / "etc" / "hello", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.unlink(p / "etc" / "motd")
    fd = os.open(p / "etc" / "motd", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"new")
    os.close(fd)
    assert (p / "etc" / "motd").read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(p / "etc" / "motd").st_mode) == 0o600
    assert not (m.upper / "data" / "d1" / "sub").exists()
    (p / "data" / "d1" / "sub" / "c").write_bytes(b"c")  # parents copied up on demand
    assert (m.upper / "data" / "d1" / "sub" / "c").read_bytes() == b"c"
    assert (p / "data" / "d1" / "sub" / "b").read_bytes() == FILES["data/d1/sub/b"]
    os.rmdir(p / "hidden")
    os.mkdir(p / "hidden")  # over the whiteout left by rmdir: a new, empty directory
    assert os.listdir(p / "hidden") == []
    with pytest.raises(FileNotFoundError):
        (p / "no-such-dir" / "x").write_bytes(b"x")


def test_xattrs_of_upper_and_lower_entries(m):
    p = m.path
    (p / "up").write_bytes(b"u")
    for path in (p / "up", p / "etc" / "hello", p / "data"):
        with pytest.raises(OSError) as exc:
            os.getxattr(path, "security.capability")
        assert exc.value.errno == errno.ENODATA
    assert os.getxattr(p / "xa", "user.color") == b"blue"  # lower
    os.setxattr(p / "up", "user.long", b"v" * 3000)
    assert os.getxattr(p / "up", "user.long") == b"v" * 3000  # a size query first
    with pytest.raises(OSError) as exc:
        os.getxattr(p / "up", "trusted.layerfs.ino")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(FileNotFoundError):
        os.getxattr(p / "gone", "user.x")


def test_setattr_of_lower_entries_copies_them_up(m):
    p = m.path
    os.chmod(p / "data" / "d1" / "a", 0o640)
    assert stat.S_IMODE(os.stat(p / "data" / "d1" / "a").st_mode) == 0o640
    assert stat.S_IMODE(os.lstat(m.upper / "data" / "d1" / "a").st_mode) == 0o640
    os.chown(p / "data" / "d1", 7, 8)
    assert (os.stat(p / "data" / "d1").st_uid, os.stat(p / "data" / "d1").st_gid) == (7, 8)
    os.utime(p / "data" / "keep", ns=(10**18, 2 * 10**18))
    assert os.stat(p / "data" / "keep").st_mtime_ns == 2 * 10**18
    assert (p / "data" / "keep").read_bytes() == FILES["data/keep"]
    with pytest.raises(FileNotFoundError):
        os.chmod(p / "gone", 0o600)


CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # vfs_cap_data, revision 2


def _caps(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability")
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return None


def test_file_capabilities_show_as_soon_as_they_change(m):
    """Paths known to have no security.capability (asked on every write) are forgotten
    when xattrs or names change."""
    p = m.path
    plain, capped = p / "plain", p / "capped"
    for path in (plain, capped):
        path.write_bytes(b"x")  # each write asks for security.capability
        assert _caps(path) is None
    os.setxattr(capped, "security.capability", CAP_NET_RAW)
    assert _caps(capped) == CAP_NET_RAW
    assert _caps(plain) is None
    os.rename(capped, plain)
    assert _caps(plain) == CAP_NET_RAW
    with open(plain, "ab") as fh:  # writing drops the capability (the kernel's removexattr)
        fh.write(b"y")
    assert _caps(plain) is None

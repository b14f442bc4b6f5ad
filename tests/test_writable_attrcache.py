"""Writable mounts' lean request paths: cached attributes stay right across hard links,
and the raw forms of create, getxattr and setattr keep the union's rules."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from pathlib import Path

import pytest
from fuse import fuse_operations

from layerfs.fs.fastfuse import RAW_PROTOTYPES, _Table
from layerfs.fs.mountinfo import load_mountinfo
from layerfs.store.local import LocalBackend
from tests.support.writable import FILES

pytest_plugins = ["tests.support.writable_fixtures"]  # the `store` and `m` fixtures

# -- unit ----------------------------------------------------------------------------------


def test_operations_table_has_libfuses_layout():
    """FastFUSE's table of plain addresses lines up with fusepy's typed struct."""
    assert ctypes.sizeof(_Table) == ctypes.sizeof(fuse_operations)
    for field in fuse_operations._fields_:
        name = field[0]
        ours, theirs = getattr(_Table, name), getattr(fuse_operations, name)
        assert (ours.offset, ours.size) == (theirs.offset, theirs.size), name
    assert set(RAW_PROTOTYPES) <= {f[0] for f in fuse_operations._fields_}


# -- through real mounts ---------------------------------------------------------------------


def _daemon_requests(store: Path, m) -> int:
    """Read system calls of the mount daemon so far: one per request it took from the kernel."""
    pid = load_mountinfo(LocalBackend(store), m.path).pid
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr line")


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


def test_repeated_stats_of_a_file_are_answered_by_the_kernel(fm, store):
    m = fm
    p = m.path / "data" / "keep"
    os.stat(p)
    before = _daemon_requests(store, m)
    for _ in range(20):
        os.stat(p)
    assert _daemon_requests(store, m) - before < 10


def test_absent_names_are_remembered_until_made_through_the_mount(fm, store):
    m = fm
    p = m.path / "data" / "not-yet"
    for _ in range(2):
        assert not p.exists()
        before = _daemon_requests(store, m)
        for _ in range(20):
            assert not p.exists()
        assert _daemon_requests(store, m) - before < 10
        p.write_bytes(b"now")  # the kernel drops what it remembered
        assert p.read_bytes() == b"now"
        os.unlink(p)
    (m.path / "data" / "dir-not-yet").mkdir()
    assert (m.path / "data" / "dir-not-yet").is_dir()
    os.rename(m.path / "data" / "dir-not-yet", p)
    assert p.is_dir()


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

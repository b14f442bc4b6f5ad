"""Every ordinary POSIX operation through real writable FUSE mounts (image and overlay mode)."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.lfsmount import public_dir
from tests.support.writable import (
    BIG,
    FILES,
    overlay_mount,
)

pytestmark = pytest.mark.fuse
pytest_plugins = ["tests.support.writable_fixtures"]  # the `store` and `m` fixtures


def test_lower_tree_shows_through(m):
    p = m.path
    assert sorted(os.listdir(p / "etc")) == ["hello", "motd"]  # etc/old whited out
    assert os.listdir(p / "hidden") == []  # opaque in the top layer
    assert (p / "top").read_bytes() == FILES["top"]
    assert (p / "big").read_bytes() == BIG
    assert os.readlink(p / "sym") == "etc/hello"
    assert stat.S_ISFIFO(os.lstat(p / "fifo").st_mode)


def test_create_write_read_after_write(m):
    path = m.path / "data" / "new.txt"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o640)
    assert os.write(fd, b"hello") == 5
    assert os.pread(fd, 5, 0) == b"hello"
    os.pwrite(fd, b"J", 0)
    os.close(fd)
    assert path.read_bytes() == b"Jello"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert (m.upper / "data" / "new.txt").read_bytes() == b"Jello"


def test_write_into_lower_file(m):
    path = m.path / "etc" / "motd"
    with open(path, "r+b") as fh:
        fh.seek(3)
        fh.write(b"XYZ")
    want = FILES["etc/motd"][:3] + b"XYZ" + FILES["etc/motd"][6:]
    assert path.read_bytes() == want


def test_truncate_ftruncate_and_o_trunc(m):
    p = m.path
    os.truncate(p / "etc" / "motd", 7)
    assert (p / "etc" / "motd").read_bytes() == FILES["etc/motd"][:7]
    fd = os.open(p / "data" / "keep", os.O_RDWR)
    os.ftruncate(fd, 2)
    os.ftruncate(fd, 6)
    os.close(fd)
    assert (p / "data" / "keep").read_bytes() == b"ke\0\0\0\0"
    fd = os.open(p / "etc" / "hello", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"bye")
    os.close(fd)
    assert (p / "etc" / "hello").read_bytes() == b"bye"
    os.truncate(p / "big", len(BIG) + 10)
    assert (p / "big").read_bytes() == BIG + bytes(10)


def test_o_append_and_o_excl(m):
    p = m.path / "etc" / "hello"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"more\n")
    os.close(fd)
    assert p.read_bytes() == FILES["etc/hello"] + b"more\n"
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(FileExistsError):
        os.open(m.path / "data" / "d1" / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(m.path / "fresh", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def test_unlink_lower_and_upper_files(m):
    p = m.path
    os.unlink(p / "etc" / "hello")
    assert not (p / "etc" / "hello").exists()
    assert sorted(os.listdir(p / "etc")) == ["motd"]
    (p / "etc" / "hello").write_bytes(b"again")  # recreate over the whiteout
    assert (p / "etc" / "hello").read_bytes() == b"again"
    (p / "tmpfile").write_bytes(b"t")
    os.unlink(p / "tmpfile")
    assert not os.path.lexists(p / "tmpfile")
    with pytest.raises(FileNotFoundError):
        os.unlink(p / "etc" / "old")


def test_mkdir_rmdir_and_opaque_recreate(m):
    p = m.path
    with pytest.raises(OSError) as exc:
        os.rmdir(p / "data" / "d1")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(p / "data" / "d1" / "sub" / "b")
    os.rmdir(p / "data" / "d1" / "sub")
    os.unlink(p / "data" / "d1" / "a")
    os.rmdir(p / "data" / "d1")
    assert os.listdir(p / "data") == ["keep"]
    os.mkdir(p / "data" / "d1", 0o700)
    assert os.listdir(p / "data" / "d1") == []  # lower children stay hidden
    assert stat.S_IMODE(os.stat(p / "data" / "d1").st_mode) == 0o700
    os.mkdir(p / "newdir")
    os.rmdir(p / "newdir")
    assert not (p / "newdir").exists()


def test_rename_files_replacing_targets(m):
    p = m.path
    os.rename(p / "etc" / "hello", p / "etc" / "motd")  # lower over lower
    assert (p / "etc" / "motd").read_bytes() == FILES["etc/hello"]
    assert not (p / "etc" / "hello").exists()
    (p / "n1").write_bytes(b"n1")
    os.rename(p / "n1", p / "data" / "keep")  # upper over lower
    assert (p / "data" / "keep").read_bytes() == b"n1"
    os.rename(p / "top", p / "data" / "d1" / "sub" / "moved")  # into a lower subdir
    assert (p / "data" / "d1" / "sub" / "moved").read_bytes() == FILES["top"]
    assert sorted(os.listdir(p)) == sorted(
        ["etc", "data", "hidden", "hl1", "hl2", "big", "xa", "sym", "fifo"]
    )


def test_rename_lower_directory(m):
    p = m.path
    os.rename(p / "data" / "d1", p / "d1moved")
    assert not (p / "data" / "d1").exists()
    assert sorted(os.listdir(p / "d1moved")) == ["a", "sub"]
    assert (p / "d1moved" / "sub" / "b").read_bytes() == FILES["data/d1/sub/b"]
    (p / "d1moved" / "a").write_bytes(b"changed")
    assert (p / "d1moved" / "a").read_bytes() == b"changed"
    os.mkdir(p / "data" / "d1")  # the old place is free, and empty
    assert os.listdir(p / "data" / "d1") == []
    os.rename(p / "d1moved", p / "data" / "d1")  # replace an empty directory
    assert sorted(os.listdir(p / "data" / "d1")) == ["a", "sub"]
    assert (p / "data" / "d1" / "sub" / "b").read_bytes() == FILES["data/d1/sub/b"]


def test_rename_directory_over_non_empty_fails(m):
    with pytest.raises(OSError) as exc:
        os.rename(m.path / "etc", m.path / "data")
    assert exc.value.errno in (errno.ENOTEMPTY, errno.EEXIST)


def test_link_and_symlink(m):
    p = m.path
    os.link(p / "etc" / "hello", p / "hello-link")
    assert os.stat(p / "hello-link").st_nlink == 2
    assert os.stat(p / "hello-link").st_ino == os.stat(p / "etc" / "hello").st_ino
    with open(p / "hello-link", "ab") as fh:
        fh.write(b"+")
    assert (p / "etc" / "hello").read_bytes() == FILES["etc/hello"] + b"+"
    os.symlink("../etc/motd", p / "data" / "lnk")
    assert os.readlink(p / "data" / "lnk") == "../etc/motd"
    assert (p / "data" / "lnk").read_bytes() == FILES["etc/motd"]


def test_mknod_and_mkfifo(m):
    p = m.path
    os.mknod(p / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(p / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    os.mkfifo(p / "pipe", 0o600)
    assert stat.S_ISFIFO(os.lstat(p / "pipe").st_mode)
    assert stat.S_IMODE(os.lstat(p / "pipe").st_mode) == 0o600


def test_chmod_chown_utimens(m):
    p = m.path / "etc" / "motd"
    os.chmod(p, 0o4750)
    os.chown(p, 1234, 5678)
    os.utime(p, ns=(1_600_000_000_000_000_001, 1_500_000_000_000_000_002))
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o750  # chown clears setuid, as on any fs
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_500_000_000_000_000_002
    assert st.st_atime_ns == 1_600_000_000_000_000_001
    os.chmod(p, 0o4750)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4750
    assert p.read_bytes() == FILES["etc/motd"]
    os.chown(m.path / "sym", 42, 43, follow_symlinks=False)
    assert os.lstat(m.path / "sym").st_uid == 42
    assert os.stat(m.path / "sym").st_uid == 0


def test_xattrs(m):
    p = m.path / "xa"
    assert os.getxattr(p, "user.color") == b"blue"
    os.setxattr(p, "user.size", b"large")
    assert sorted(os.listxattr(p)) == ["user.color", "user.size"]
    os.removexattr(p, "user.color")
    assert os.listxattr(p) == ["user.size"]
    with pytest.raises(OSError) as exc:
        os.getxattr(p, "user.color")
    assert exc.value.errno == errno.ENODATA
    os.chmod(m.path / "big", 0o600)  # a metacopy file: private xattrs stay private
    assert not [n for n in os.listxattr(m.path / "big") if "layerfs" in n or "overlay" in n]
    os.setxattr(m.path / "data", "trusted.note", b"dir")
    assert os.getxattr(m.path / "data", "trusted.note") == b"dir"
    assert "trusted.overlay.opaque" not in os.listxattr(m.path / "hidden")


def test_fsync_and_statfs(m):
    fd = os.open(m.path / "etc" / "hello", os.O_RDWR)
    os.write(fd, b"H")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert (m.path / "etc" / "hello").read_bytes()[:1] == b"H"
    sv = os.statvfs(m.path)
    assert sv.f_blocks > 0 and sv.f_bavail > 0 and sv.f_namemax == 255


def test_sparse_file_over_4_gib(m):
    p = m.path / "sparse"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    off = (5 << 30) + 123
    os.pwrite(fd, b"tail", off)
    os.pwrite(fd, b"head", 0)
    os.close(fd)
    st = os.stat(p)
    assert st.st_size == off + 4
    assert st.st_blocks * 512 < 1 << 20  # still sparse
    fd = os.open(p, os.O_RDONLY)
    assert os.pread(fd, 4, off) == b"tail"
    assert os.pread(fd, 8, 1 << 32) == bytes(8)
    os.close(fd)


def test_shared_writable_mmap(m):
    for name in ("etc/motd", "mapped-new"):
        p = m.path / name
        if not p.exists():
            p.write_bytes(bytes(8192))
        before = p.read_bytes()
        fd = os.open(p, os.O_RDWR)
        with mmap.mmap(fd, len(before), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[0:6] = b"MAPPED"
            mm.flush()
        os.close(fd)
        assert p.read_bytes() == b"MAPPED" + before[6:]


def test_readdir_merges_layers_and_upper(m):
    p = m.path
    (p / "etc" / "new").write_bytes(b"n")
    os.unlink(p / "etc" / "motd")
    assert sorted(os.listdir(p / "etc")) == ["hello", "new"]
    names = sorted(e.name for e in os.scandir(p))
    assert names == sorted(
        ["etc", "data", "hidden", "hl1", "hl2", "big", "xa", "sym", "fifo", "top"]
    )


# -- paths near PATH_MAX, and one-time utimensat ----------------------------------------

PATH_MAX = 4096


def _long_rel() -> str:
    """A relative path of PATH_MAX - 1 bytes: 39 directories of 100 bytes, then a file name."""
    dirs = "/".join(f"{i:02d}" + "d" * 98 for i in range(39)) + "/"
    return dirs + "f" * (PATH_MAX - 1 - len(dirs))


_LONG_PATH_SCRIPT = r"""
import errno, os, stat, sys
rel, short = sys.argv[1], "short"
parts = rel.split("/")
for i in range(1, len(parts)):
    os.mkdir("/".join(parts[:i]))
with open(rel, "wb") as fh:
    fh.write(b"deep data")
os.chmod(rel, 0o640)
os.chown(rel, 12, 34)
os.truncate(rel, 4)
os.utime(rel, ns=(10**18, 2 * 10**18))
os.setxattr(rel, "user.k", b"v")
assert os.getxattr(rel, "user.k") == b"v" and "user.k" in os.listxattr(rel)
os.removexattr(rel, "user.k")
st = os.stat(rel)
assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (12, 34), st
assert st.st_mtime_ns == 2 * 10**18 and st.st_size == 4, st
assert open(rel, "rb").read() == b"deep"
os.rename(rel, short)
assert open(short, "rb").read() == b"deep"
os.rename(short, rel)
os.link(rel, short)
assert os.stat(short).st_nlink == 2
os.unlink(short)
os.symlink(rel, short)
assert os.readlink(short) == rel and open(short, "rb").read() == b"deep"
os.unlink(short)
try:
    os.stat(rel + "x")
    raise AssertionError("a path of PATH_MAX bytes was accepted")
except OSError as exc:
    assert exc.errno == errno.ENAMETOOLONG, exc
print("kept")
"""

_LONG_PATH_KINDS = r"""
import os, stat, sys
rel = sys.argv[1]
os.unlink(rel)
os.symlink("target", rel)
assert os.readlink(rel) == "target"
os.unlink(rel)
os.mkfifo(rel, 0o600)
assert stat.S_ISFIFO(os.lstat(rel).st_mode)
os.unlink(rel)
os.mknod(rel, stat.S_IFCHR | 0o600, os.makedev(1, 3))
assert os.major(os.lstat(rel).st_rdev) == 1
os.unlink(rel)
os.mkdir(rel, 0o700)
os.rmdir(rel)
assert os.listdir(os.path.dirname(rel)) == []
print("done")
"""


def _python_in(cwd: Path, script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_paths_near_path_max(m):
    """Every call works on a path of PATH_MAX - 1 bytes inside the mount, although the
    upper (and mount) directory's own path plus that path is longer than PATH_MAX."""
    rel = _long_rel()
    assert len(str(m.upper)) + 1 + len(rel) >= PATH_MAX
    assert _python_in(m.path, _LONG_PATH_SCRIPT, rel) == "kept"
    ufd = os.open(m.upper, os.O_PATH | os.O_DIRECTORY)
    try:
        st = os.stat(rel, dir_fd=ufd, follow_symlinks=False)
    finally:
        os.close(ufd)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 4  # in the upper tree, found by its fd
    assert _python_in(m.path, _LONG_PATH_KINDS, rel) == "done"


def test_lower_file_at_path_near_path_max(store):
    """A lower file whose lower path exceeds PATH_MAX is read, its xattrs shown, copied up."""
    rel = _long_rel()
    with public_dir("lfsrw-") as base:
        lower = base / "lower"
        lower.mkdir(mode=0o755)
        lfd = os.open(lower, os.O_PATH | os.O_DIRECTORY)
        try:
            parts = rel.split("/")
            for i in range(1, len(parts)):
                os.mkdir("/".join(parts[:i]), dir_fd=lfd)
            fd = os.open(rel, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=lfd)
            os.write(fd, b"lower bytes")
            os.setxattr(fd, "user.k", b"lower")
            os.close(fd)
        finally:
            os.close(lfd)
        with overlay_mount(store, [lower], base / "u", base / "w", base / "m") as mnt:
            script = r"""
import os, sys
rel = sys.argv[1]
assert open(rel, "rb").read() == b"lower bytes"
assert os.getxattr(rel, "user.k") == b"lower"
os.chmod(rel, 0o600)
with open(rel, "ab") as fh:
    fh.write(b"+more")
assert open(rel, "rb").read() == b"lower bytes+more"
assert os.getxattr(rel, "user.k") == b"lower"
print("copied")
"""
            assert _python_in(mnt.path, script, rel) == "copied"
            ufd = os.open(mnt.upper, os.O_PATH | os.O_DIRECTORY)
            try:
                fd = os.open(rel, os.O_RDONLY, dir_fd=ufd)
            finally:
                os.close(ufd)
            try:
                assert os.read(fd, 100) == b"lower bytes+more"
                assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
            finally:
                os.close(fd)


def test_touch_one_time_keeps_the_other(m):
    """utimensat with UTIME_OMIT for one time (touch -a / -m) sets only the other one."""
    for p in (m.path / "etc" / "motd", m.path / "fresh-file"):
        if not p.exists():
            p.write_bytes(b"x")
        before = os.stat(p)
        subprocess.run(["touch", "-a", "-d", "@1000000000", str(p)], check=True)
        st = os.stat(p)
        assert st.st_atime_ns == 1_000_000_000 * 10**9
        assert st.st_mtime_ns == before.st_mtime_ns
        subprocess.run(["touch", "-m", "-d", "@1200000000", str(p)], check=True)
        st = os.stat(p)
        assert st.st_atime_ns == 1_000_000_000 * 10**9
        assert st.st_mtime_ns == 1_200_000_000 * 10**9
        subprocess.run(["touch", str(p)], check=True)  # both now
        assert os.stat(p).st_mtime_ns > 1_200_000_000 * 10**9


def test_open_for_writing_without_writing_keeps_times(m):
    """Copy-up (whole file in overlay mode) on an open for writing keeps the lower times."""
    p = m.path / "big"
    before = os.stat(p)
    os.close(os.open(p, os.O_WRONLY))
    after = os.stat(p)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert p.read_bytes() == BIG


def test_names_of_name_max_bytes(m):
    """A name of NAME_MAX bytes works (its whiteout name ``.wh.NAME`` would be too long)."""
    name = "n" * 255
    p = m.path / "data" / name
    os.mkdir(p, 0o755)
    os.rmdir(p)
    p.write_bytes(b"long name")
    assert p.read_bytes() == b"long name"
    os.rename(p, m.path / name)
    os.symlink("../" + name, p)
    assert os.readlink(p) == "../" + name and p.read_bytes() == b"long name"
    os.unlink(p)
    os.mkfifo(p)
    assert name in os.listdir(m.path / "data")
    os.unlink(p)
    os.unlink(m.path / name)
    with pytest.raises(OSError) as exc:
        os.mkdir(m.path / (name + "x"))
    assert exc.value.errno == errno.ENAMETOOLONG

"""Real FUSE mounts of synthetic images through the `layerfs mount` command."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from layerfs.fs.mounting import find_mount
from layerfs.fs.overlay import find_overlay
from layerfs.fs.views import ViewInfo
from layerfs.records import Entry, Kind
from layerfs.store.location import open_store
from tests.support.blobs import corrupt_blob
from tests.support.lfsmount import LAYERFS, as_nobody, layerfs, mounted, public_dir
from tests.support.repos import clean_env
from tests.support.synthetic import MTIME, d, f, link, make_image, opq, sym, wh

pytestmark = pytest.mark.fuse

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12
BIG = os.urandom(900_000)
LONG = "L" * 255


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    root = tmp_path_factory.mktemp("lfsmnt-store")
    s = open_store(str(root))
    make_image(
        s,
        "lfsmnt/feature:1",
        [
            [
                d("", mode=0o755),
                d("etc"),
                f(s, "etc/hello", b"hello world\n", mtime_ns=MTIME),
                f(s, "etc/shadow", b"secret\n", mode=0o600),
                f(s, "etc/gone", b"x"),
                d("opq"),
                f(s, "opq/lower", b"l"),
                d("dev"),
                f(s, "big", BIG),
                f(s, "victim", os.urandom(400_000)),
            ],
            [
                wh("etc/gone"),
                opq("opq"),
                f(s, "opq/upper", b"u"),
                Entry("dev/null", Kind.CHAR, mode=0o666, rdev=(1, 3), mtime_ns=MTIME),
                Entry("dev/loop0", Kind.BLOCK, mode=0o660, gid=6, rdev=(7, 0), mtime_ns=MTIME),
                Entry("fifo", Kind.FIFO, mode=0o640, uid=12, gid=34, mtime_ns=MTIME),
                sym("etc/link", "hello"),
                link("etc/hard", "etc/hello"),
                f(s, "suid", b"#!", mode=0o4755, uid=1000, gid=1000),
                d("sticky", mode=0o1777),
                f(s, "ping", b"ping", mode=0o755, xattrs={"security.capability": CAP}),
                f(s, "user-x", b"u", xattrs={"user.color": b"blue", "user.empty": b""}),
                f(s, LONG, b"long name"),
            ],
        ],
    )
    return root


@pytest.fixture
def mnt(image_store):
    with public_dir() as base, mounted(image_store, "lfsmnt/feature:1", base / "m") as m:
        yield m


def test_listed_as_a_read_only_kernel_overlay_over_the_images_view(mnt):
    info = find_mount(mnt)
    assert info is not None and (info.fstype, info.source) == ("overlay", "layerfs")
    overlay = find_overlay(mnt)
    assert overlay is not None and overlay.readonly and overlay.upper is None
    info = ViewInfo.load(overlay.lowers[0])  # the image's metadata tree
    assert info is not None and info.image == "lfsmnt/feature:1"
    daemon = info.daemon
    view = find_mount(daemon)
    assert view is not None and (view.fstype, view.source) == ("fuse.layerfs-view", "layerfs")
    assert overlay.data_layers == [info.data_dir, daemon]  # the cache, then the view
    with open("/proc/mounts") as fh:
        line = next(ln for ln in fh if ln.split()[1] == daemon)
    opts = line.split()[3].split(",")
    assert "ro" in opts and "allow_other" in opts and "default_permissions" in opts


def test_stat_readdir_read_readlink(mnt):
    assert sorted(os.listdir(mnt)) == sorted(
        ["etc", "opq", "dev", "big", "victim", "fifo", "suid", "sticky", "ping", "user-x", LONG]
    )
    assert sorted(os.listdir(mnt / "etc")) == ["hard", "hello", "link", "shadow"]
    assert os.listdir(mnt / "opq") == ["upper"]
    st = os.stat(mnt / "etc/hello")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 12 and st.st_mtime_ns == MTIME
    assert (mnt / "etc/hello").read_bytes() == b"hello world\n"
    assert os.readlink(mnt / "etc/link") == "hello"
    assert (mnt / "etc/link").read_bytes() == b"hello world\n"
    assert (mnt / LONG).read_bytes() == b"long name"
    with os.scandir(mnt) as it:
        types = {e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in it}
    assert types["etc"] == (os.lstat(mnt / "etc").st_ino, True)


def test_hardlinks_share_ino_and_nlink(mnt):
    a, b = os.stat(mnt / "etc/hello"), os.stat(mnt / "etc/hard")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2


def test_modes_owners_devices_fifo(mnt):
    null = os.lstat(mnt / "dev/null")
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    loop = os.lstat(mnt / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and (os.major(loop.st_rdev), loop.st_gid) == (7, 6)
    fifo = os.lstat(mnt / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and (fifo.st_uid, fifo.st_gid) == (12, 34)
    assert stat.S_IMODE(fifo.st_mode) == 0o640
    suid = os.lstat(mnt / "suid")
    assert stat.S_IMODE(suid.st_mode) == 0o4755 and suid.st_uid == 1000
    assert stat.S_IMODE(os.lstat(mnt / "sticky").st_mode) == 0o1777


def test_xattrs(mnt):
    assert os.getxattr(mnt / "ping", "security.capability") == CAP
    assert sorted(os.listxattr(mnt / "user-x")) == ["user.color", "user.empty"]
    assert os.getxattr(mnt / "user-x", "user.color") == b"blue"
    assert os.getxattr(mnt / "user-x", "user.empty") == b""
    with pytest.raises(OSError) as exc:
        os.getxattr(mnt / "etc/hello", "user.none")
    assert exc.value.errno == errno.ENODATA
    out = subprocess.run(["getcap", str(mnt / "ping")], capture_output=True, text=True)
    if out.returncode == 0:  # getcap is optional here
        assert "cap_net_raw" in out.stdout


def test_writes_are_refused(mnt):
    for action in (
        lambda: open(mnt / "etc/hello", "ab"),  # noqa: SIM115
        lambda: (mnt / "new").write_bytes(b"x"),
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.unlink(mnt / "etc/hello"),
    ):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS


def test_read_at_arbitrary_offsets(mnt):
    with open(mnt / "big", "rb") as fh:
        for offset, size in [(0, 10), (65_530, 70_000), (333_333, 1), (899_000, 5000), (7, 0)]:
            fh.seek(offset)
            assert fh.read(size) == BIG[offset : offset + size]
    assert (mnt / "big").read_bytes() == BIG


def test_statfs_figures(mnt):
    """As with Docker's overlay2, statfs shows the filesystem the mount stands on (here
    the one of the image's metadata tree)."""
    sv = os.statvfs(mnt)
    host = os.statvfs(find_overlay(mnt).lowers[0])
    assert (sv.f_bsize, sv.f_blocks, sv.f_files, sv.f_namemax) == (
        host.f_bsize,
        host.f_blocks,
        host.f_files,
        host.f_namemax,
    )


def test_permissions_for_other_users(mnt):
    ok = as_nobody("cat", str(mnt / "etc/hello"))
    assert ok.returncode == 0 and ok.stdout == b"hello world\n"
    refused = as_nobody("cat", str(mnt / "etc/shadow"))
    assert refused.returncode != 0 and b"Permission denied" in refused.stderr


def test_inode_numbers_survive_umount_and_mount(image_store):
    paths = ["", "etc", "etc/hello", "etc/hard", "dev/null", "opq/upper", LONG]
    with public_dir() as base:
        with mounted(image_store, "lfsmnt/feature:1", base / "m") as m:
            first = [os.lstat(m / p).st_ino for p in paths]
        assert find_mount(base / "m") is None
        with mounted(image_store, "lfsmnt/feature:1", base / "m") as m:
            second = [os.lstat(m / p).st_ino for p in paths]
    assert first == second
    assert first[2] == first[3]  # a hard link
    assert len(set(first)) == len(first) - 1


def test_corrupt_chunk_gives_eio_and_a_log_line(tmp_path):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    s = open_store(str(tmp_path / "store"))
    data = os.urandom(500_000)
    entry = f(s, "data", data)
    make_image(s, "lfsmnt/corrupt:1", [[entry]])
    first, victim = entry.chunks[0], entry.chunks[2]
    corrupt_blob(s.backend, victim.digest, xor=0x55)
    store_dir = tmp_path / "store"
    with (
        public_dir() as base,
        mounted(store_dir, "lfsmnt/corrupt:1", base / "m") as m,
        open(m / "data", "rb") as fh,
    ):
        assert fh.read(first.size) == data[: first.size]
        with pytest.raises(OSError) as exc:
            fh.seek(sum(c.size for c in entry.chunks[:2]))
            fh.read(100)
        assert exc.value.errno == errno.EIO
    log = (tmp_path / "store/cache/logs/mount.log").read_text()
    assert victim.digest in log
    assert first.digest not in log


def test_chroot_runs_a_shell(tmp_path):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    if not os.path.exists("/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    s = open_store(str(tmp_path / "store"))
    busybox = Path("/bin/busybox").read_bytes()
    make_image(
        s,
        "lfsmnt/shell:1",
        [
            [d("bin"), f(s, "bin/busybox", busybox, mode=0o755), sym("bin/sh", "busybox")],
            [d("etc"), f(s, "etc/motd", b"from the upper layer\n"), sym("bin/cat", "busybox")],
        ],
    )
    with public_dir() as base, mounted(tmp_path / "store", "lfsmnt/shell:1", base / "m") as m:
        out = subprocess.run(
            [
                shutil.which("chroot") or "/usr/sbin/chroot",
                str(m),
                "/bin/sh",
                "-c",
                "cat /etc/motd; echo $((6*7))",
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/bin"},
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from the upper layer\n42\n"


def test_foreground_is_refused_for_an_image_mount(image_store):
    with public_dir() as base:
        (base / "m").mkdir()
        proc = layerfs(image_store, "mount", "-f", "lfsmnt/feature:1", str(base / "m"), check=False)
        assert proc.returncode == 2 and "kernel overlay" in proc.stderr
        assert find_mount(base / "m") is None


@pytest.mark.parametrize("how", ["layerfs umount", "umount"])
def test_unmounting_needs_no_store_or_password_and_releases_the_view(image_store, how):
    """`layerfs umount` (no --store, no password) takes the view down with the last
    mount over it; after the system's umount the view finds itself unused and goes."""
    with public_dir() as base:
        m, m2 = base / "m", base / "m2"
        m.mkdir()
        m2.mkdir()
        layerfs(image_store, "mount", "lfsmnt/feature:1", str(m))
        layerfs(image_store, "mount", "lfsmnt/feature:1", str(m2))
        image_dir = find_overlay(m).lowers[0]
        assert find_overlay(m2).lowers[0] == image_dir  # one view for every mount of an image
        pid = ViewInfo.load(image_dir).pid
        view = ViewInfo.load(image_dir).daemon  # the store's view daemon
        for target in (m, m2):
            cmd = [LAYERFS, "umount", str(target)] if how == "layerfs umount" else ["umount"]
            if how == "umount":
                cmd.append(str(target))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd="/")
            assert proc.returncode == 0, proc.stderr
            assert find_mount(target) is None
            if target == m:
                assert find_mount(view) is not None  # m2 still uses it
        deadline = time.monotonic() + 60
        while (find_mount(view) is not None or _alive(pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert find_mount(view) is None and not _alive(pid)
        assert not os.path.exists(view)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_errors_are_one_line_and_leave_nothing_mounted(image_store):
    with public_dir() as base:
        (base / "m").mkdir()
        proc = layerfs(image_store, "mount", "lfsmnt/none:1", str(base / "m"), check=False)
        assert proc.returncode == 1 and "no image named" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert find_mount(base / "m") is None
        proc = layerfs(image_store, "umount", str(base / "m"), check=False)
        assert proc.returncode == 1 and "is not a layerfs mount" in proc.stderr
        proc = layerfs(image_store, "mount", "lfsmnt/feature:1", str(base / "nodir"), check=False)
        assert proc.returncode == 1 and "not a directory" in proc.stderr


def test_parallel_readers_get_the_same_bytes(mnt):
    from concurrent.futures import ThreadPoolExecutor

    names = ["big", "victim", "etc/hello", "etc/hard", LONG] * 4

    def read_all(name: str) -> tuple[str, bytes, list[str]]:
        return name, (mnt / name).read_bytes(), sorted(os.listdir(mnt / "etc"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(read_all, names))
    expected = {name: (mnt / name).read_bytes() for name in set(names)}
    assert expected["big"] == BIG
    for name, data, listing in results:
        assert data == expected[name]
        assert listing == ["hard", "hello", "link", "shadow"]

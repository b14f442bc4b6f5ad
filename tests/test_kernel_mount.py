"""Image mounts as kernel overlays: bytes from the content cache, writes in a kernel upper.

Through the real `layerfs` command, real FUSE (the image view) and kernel overlayfs.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest

from layerfs.fs.imageview import READ_AHEAD_KIB
from layerfs.fs.mounting import find_mount
from layerfs.fs.overlay import find_overlay
from layerfs.fs.views import ViewInfo
from layerfs.store.location import open_store
from tests.support.lfsmount import layerfs, mounted, public_dir
from tests.support.synthetic import d, f, make_image

pytestmark = pytest.mark.fuse

BIG = os.urandom(6_000_000)
IMAGE = "kmount/base:1"


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    root = tmp_path_factory.mktemp("kmount-store")
    s = open_store(str(root))
    layer = [d(""), d("data"), f(s, "data/big", BIG), f(s, "data/small", b"small\n")]
    layer += [d("etc"), f(s, "etc/conf", b"a=1\n", mode=0o640), d("tree"), d("tree/sub")]
    layer += [f(s, "tree/sub/leaf", b"leaf\n")]
    make_image(s, IMAGE, [layer])
    return root


def _view(mnt: Path) -> ViewInfo:
    overlay = find_overlay(mnt)
    assert overlay is not None
    info = ViewInfo.load(overlay.lowers[0])
    assert info is not None
    return info


def _rchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar line")


def _cache_file(view: ViewInfo, rel: str) -> Path:
    """Where the content of ``rel`` goes in the content cache (its metadata tree says)."""
    redirect = os.getxattr(Path(view.path) / rel, "trusted.overlay.redirect")
    return Path(view.data_dir) / redirect.decode().lstrip("/")


def _wait_cached(view: ViewInfo, rel: str) -> None:
    deadline = time.monotonic() + 60
    while not _cache_file(view, rel).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{rel} was not cached within 60 s")
        time.sleep(0.05)


def test_file_bytes_come_from_the_content_cache_not_the_view(image_store):
    with public_dir("kmount-") as base, mounted(image_store, IMAGE, base / "m") as m:
        view = _view(m)
        _wait_cached(view, "data/big")
        redirect = os.getxattr(Path(view.path) / "data/big", "trusted.overlay.redirect")
        cached = Path(view.data_dir) / redirect.decode().lstrip("/")
        assert cached.read_bytes() == BIG
        assert stat.S_IMODE(cached.stat().st_mode) == 0o444
        # a fresh mount looks the file up again, now as a metacopy file
        with mounted(image_store, IMAGE, base / "m2") as m2:
            assert _view(m2).path == view.path
            before = _rchar(view.pid)
            assert (m2 / "data/big").read_bytes() == BIG
            assert _rchar(view.pid) - before < len(BIG) // 10
            st = os.stat(m2 / "data/big")
            assert st.st_size == len(BIG) and stat.S_IMODE(st.st_mode) == 0o644
        # the image's own xattrs show, the overlay's private ones never do
        assert "trusted.overlay.redirect" not in os.listxattr(m / "data/big")


def test_reads_are_served_by_the_view_while_the_cache_cannot_be_written(image_store, tmp_path):
    """A cache that cannot take content (here: its temp directory is a file, as on a
    broken or full disk) leaves every file readable through the view's contents."""
    cache = open_store(str(image_store)).backend.cache_dir() / "content"
    saved = tmp_path / "saved"
    if cache.exists():
        cache.rename(saved)
    cache.mkdir(parents=True)
    (cache / "tmp").write_text("not a directory")
    try:
        with public_dir("kmount-") as base, mounted(image_store, IMAGE, base / "m") as m:
            assert (m / "data/big").read_bytes() == BIG
            assert (m / "tree/sub/leaf").read_bytes() == b"leaf\n"
            view = _view(m)
            assert not _cache_file(view, "data/big").exists()
            # such reads come in requests of up to READ_AHEAD_KIB, not the kernel's 128 KiB
            mount = find_mount(view.daemon)
            assert mount is not None
            ahead = Path(f"/sys/class/bdi/{mount.device}/read_ahead_kb").read_text()
            assert int(ahead) == READ_AHEAD_KIB > 128
    finally:
        import shutil

        time.sleep(3)  # the view goes once unused
        shutil.rmtree(cache)
        if saved.exists():
            saved.rename(cache)


def test_a_writable_mount_keeps_changes_in_a_kernel_upper_and_commits_them(image_store):
    with public_dir("kmount-") as base:
        upper = base / "changes"
        (base / "m").mkdir()
        layerfs(image_store, "mount", IMAGE, str(base / "m"), "--upper", str(upper))
        m = base / "m"
        try:
            (m / "new").write_bytes(b"new file\n")
            os.chmod(m / "data/big", 0o600)  # metadata only: no bytes copied up
            os.rename(m / "tree", m / "moved")  # a lower directory renamed (redirect_dir)
            os.unlink(m / "etc/conf")
            with open(m / "data/small", "ab") as fh:
                fh.write(b"more\n")
            tree = upper / "upper"
            assert os.getxattr(tree / "data/big", "trusted.overlay.metacopy") is not None
            assert os.stat(tree / "data/big").st_blocks * 512 < 64 * 1024  # xattrs only
            gone = os.lstat(tree / "etc/conf")
            assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
            assert os.getxattr(tree / "moved", "trusted.overlay.redirect") == b"tree"
            diff = layerfs(image_store, "diff", str(m)).stdout.splitlines()
            for line in ("A /new", "C /data/big", "D /etc/conf", "A /moved/sub/leaf", "D /tree"):
                assert line in diff
            layerfs(image_store, "commit", str(m), "-t", "kmount/changed:1")
        finally:
            layerfs(image_store, "umount", str(m))
        with mounted(image_store, "kmount/changed:1", base / "c") as c:
            assert (c / "new").read_bytes() == b"new file\n"
            assert (c / "data/big").read_bytes() == BIG
            assert stat.S_IMODE(os.stat(c / "data/big").st_mode) == 0o600
            assert (c / "data/small").read_bytes() == b"small\nmore\n"
            assert (c / "moved/sub/leaf").read_bytes() == b"leaf\n"
            assert not (c / "tree").exists() and not (c / "etc/conf").exists()


def test_sigkill_of_the_view_leaves_the_upper_intact_and_committable(image_store):
    with public_dir("kmount-") as base:
        upper = base / "changes"
        m = base / "m"
        m.mkdir()
        layerfs(image_store, "mount", IMAGE, str(m), "--upper", str(upper))
        (m / "kept").write_bytes(b"written before the kill\n")
        for rel in ("data/big", "data/small", "etc/conf", "tree/sub/leaf"):
            _wait_cached(_view(m), rel)
        pid = _view(m).pid
        os.kill(pid, signal.SIGKILL)
        # the metadata tree and the content cache are local: the mount goes on
        assert sorted(os.listdir(m / "data")) == ["big", "small"]
        assert (m / "data/big").read_bytes() == BIG
        (m / "after").write_bytes(b"written after the kill\n")
        layerfs(image_store, "umount", str(m))
        # mounted again with the same upper: a new view, the change still there
        layerfs(image_store, "mount", IMAGE, str(m), "--upper", str(upper))
        try:
            assert _view(m).pid != pid
            assert (m / "kept").read_bytes() == b"written before the kill\n"
            assert (m / "after").read_bytes() == b"written after the kill\n"
            assert (m / "data/big").read_bytes() == BIG
            layerfs(image_store, "commit", str(m), "-t", "kmount/kept:1")
        finally:
            layerfs(image_store, "umount", str(m))
        with mounted(image_store, "kmount/kept:1", base / "c") as c:
            assert (c / "kept").read_bytes() == b"written before the kill\n"


def test_an_upper_of_the_fuse_engine_is_refused_with_a_clear_message(image_store):
    with public_dir("kmount-") as base:
        upper = base / "old"
        upper.mkdir()
        info = open_store(str(image_store))
        from layerfs.catalog import Catalog

        record = Catalog(info.backend).get_image(IMAGE)
        (upper / "layerfs.json").write_text(
            f'{{"format": 1, "image": "{record.name}", "image_id": "{record.id}"}}'
        )
        (base / "m").mkdir()
        proc = layerfs(
            image_store, "mount", IMAGE, str(base / "m"), "--upper", str(upper), check=False
        )
        assert proc.returncode == 1 and "upper format 1, not 2" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert find_overlay(base / "m") is None


def _cached_ids(image_store: Path) -> set[str]:
    data = open_store(str(image_store)).backend.cache_dir() / "content" / "data"
    return {p.name for p in data.glob("*/*")}


def test_the_cache_evicts_only_what_no_mounted_image_uses(image_store, monkeypatch):
    s = open_store(str(image_store))
    make_image(s, "kmount/other:1", [[d(""), f(s, "other", b"other content\n" * 1000)]])
    with public_dir("kmount-") as base:
        with mounted(image_store, IMAGE, base / "m") as m:
            for rel in ("data/big", "data/small", "etc/conf", "tree/sub/leaf"):
                _wait_cached(_view(m), rel)
            mine = _cached_ids(image_store)
            assert len(mine) >= 4  # big, small, conf, leaf (and other tests' leftovers)
            out = layerfs(image_store, "cache", "prune").stdout
            assert out.startswith("evicted ") and "; 4 left" in out
            used = _cached_ids(image_store)  # exactly the mounted image's 4 contents
            assert len(used) == 4 and used <= mine
            assert (m / "data/big").read_bytes() == BIG
        # a bound: the next view's fill evicts what no mounted image uses
        monkeypatch.setenv("LAYERFS_CACHE_MAX", "1K")
        with mounted(image_store, "kmount/other:1", base / "o") as o:
            _wait_cached(_view(o), "other")
            deadline = time.monotonic() + 30
            while _cached_ids(image_store) & used and time.monotonic() < deadline:
                time.sleep(0.05)
            left = _cached_ids(image_store)
            assert not left & used  # the unmounted image's contents went
            assert len(left) == 1  # the mounted one's stayed, over the bound
            assert (o / "other").read_bytes() == b"other content\n" * 1000
    usage = layerfs(image_store, "cache", "usage").stdout
    assert ": 1 contents, " in usage and "mounted:" not in usage


def test_overlay_xattrs_an_image_carries_cannot_redirect_its_files(image_store):
    """A layer may carry trusted.overlay.* xattrs of its own; the metadata tree never
    copies them, so a file cannot be pointed at another image's content."""
    s = open_store(str(image_store))
    hostile = f(s, "stolen", b"mine\n", xattrs={"trusted.overlay.redirect": b"/ab/" + b"c" * 64})
    hostile.xattrs["trusted.overlay.metacopy"] = b""
    make_image(s, "kmount/hostile:1", [[d(""), hostile]])
    with public_dir("kmount-") as base, mounted(image_store, "kmount/hostile:1", base / "h") as h:
        assert (h / "stolen").read_bytes() == b"mine\n"
        tree = Path(_view(h).path)
        redirect = os.getxattr(tree / "stolen", "trusted.overlay.redirect")
        assert redirect != b"/ab/" + b"c" * 64 and redirect.startswith(b"/")


def test_rmi_frees_the_index_and_metadata_tree_no_other_image_or_mount_uses(tmp_path):
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    from layerfs.catalog import Catalog
    from layerfs.content.metatree import meta_tree_path
    from layerfs.index import index_path

    root = tmp_path / "store"
    s = open_store(str(root))
    make_image(s, "rmi/a:1", [[d(""), f(s, "a", b"a\n")]])
    make_image(s, "rmi/a:twin", [[d(""), f(s, "a", b"a\n")]])  # the same layers
    make_image(s, "rmi/b:1", [[d(""), f(s, "b", b"b\n")]])
    with public_dir("kmount-rmi-") as base:
        for image in ("rmi/a:1", "rmi/b:1"):
            with mounted(root, image, base / "m"):
                pass
        catalog = Catalog(s.backend)
        index_a = index_path(s, catalog.get_image("rmi/a:1"))
        index_b = index_path(s, catalog.get_image("rmi/b:1"))
        meta = root / "cache" / "meta"
        assert s.backend.cache_dir() / "meta" == meta
        assert index_a.exists() and meta_tree_path(meta, index_a).is_dir()
        # its twin has the same index: nothing is freed
        out = layerfs(root, "rmi", "rmi/a:1").stdout
        assert "freed" not in out
        assert index_a.exists() and meta_tree_path(meta, index_a).is_dir()
        layerfs(root, "rmi", "rmi/a:twin")
        assert not index_a.exists() and not meta_tree_path(meta, index_a).exists()
        # a mounted image keeps them until it is mounted no more
        with mounted(root, "rmi/b:1", base / "m"):
            layerfs(root, "rmi", "rmi/b:1")
            assert index_b.exists() and meta_tree_path(meta, index_b).is_dir()
            assert (base / "m" / "b").read_bytes() == b"b\n"


def test_after_a_reboot_the_image_mounts_again_with_its_upper(image_store, monkeypatch):
    """A reboot: no clean unmount, every mount gone, /run emptied; the store's
    cache (index, metadata tree, contents) and the upper directory stay."""
    import shutil
    import subprocess
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="kmount-run-"))
    monkeypatch.setenv("LAYERFS_RUN_DIR", str(run))
    with public_dir("kmount-") as base:
        upper, m = base / "changes", base / "m"
        m.mkdir()
        layerfs(image_store, "mount", IMAGE, str(m), "--upper", str(upper))
        (m / "kept").write_bytes(b"written before the reboot\n")
        view = _view(m)
        assert view.daemon.startswith(f"{run}/")
        os.sync()
        os.kill(view.pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", str(m)], check=True)
        subprocess.run(["umount", "-l", view.daemon], check=True)
        shutil.rmtree(run)
        layerfs(image_store, "mount", IMAGE, str(m), "--upper", str(upper))
        try:
            assert _view(m).pid != view.pid
            assert (m / "kept").read_bytes() == b"written before the reboot\n"
            assert (m / "data/big").read_bytes() == BIG
            assert (m / "etc/conf").read_bytes() == b"a=1\n"
        finally:
            layerfs(image_store, "umount", str(m))
    shutil.rmtree(run, ignore_errors=True)


def test_without_data_only_layers_the_view_serves_the_bytes(image_store, monkeypatch):
    """As on a kernel before 6.5: the overlay's only lower is the image's view."""
    monkeypatch.setenv("LAYERFS_DATA_ONLY_LAYERS", "off")
    monkeypatch.setenv("LAYERFS_RUN_DIR", str(image_store / "run-without-data-only"))
    with public_dir("kmount-") as base:
        upper, m = base / "changes", base / "m"
        m.mkdir()
        layerfs(image_store, "mount", IMAGE, str(m), "--upper", str(upper))
        try:
            overlay = find_overlay(m)
            assert overlay is not None and overlay.data_layers == []
            view = _view(m)
            assert not view.redirects and view.path.startswith(view.daemon + "/")
            assert (m / "data/big").read_bytes() == BIG
            assert (m / "tree/sub/leaf").read_bytes() == b"leaf\n"
            with open(m / "etc/conf", "ab") as conf:  # a copy-up reads the whole file
                conf.write(b"b=2\n")
            assert (m / "etc/conf").read_bytes() == b"a=1\nb=2\n"
            assert (upper / "upper/etc/conf").read_bytes() == b"a=1\nb=2\n"
            assert oct(stat.S_IMODE((m / "etc/conf").stat().st_mode)) == oct(0o640)
            log = (image_store / "cache/logs/mount.log").read_text()
            assert "has no data-only overlay layers" in log
        finally:
            layerfs(image_store, "umount", str(m))


def test_without_prefetch_the_view_caches_only_what_is_read(tmp_path):
    """As for a lazy volume, whose own fill copies every file out."""
    import subprocess
    import sys
    import textwrap

    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    image_store = tmp_path / "store"  # a content cache of its own, empty
    s = open_store(str(image_store))
    layer = [d(""), d("data"), f(s, "data/big", BIG), f(s, "data/small", b"small\n")]
    layer += [d("etc"), f(s, "etc/conf", b"a=1\n"), d("tree"), d("tree/sub")]
    make_image(s, IMAGE, [layer + [f(s, "tree/sub/leaf", b"leaf\n")]])
    with public_dir("kmount-") as base:
        m = base / "m"
        m.mkdir()
        script = textwrap.dedent(
            f"""
            from pathlib import Path
            from layerfs.catalog import Catalog
            from layerfs.fs.service import mount_image
            from layerfs.store.location import open_store
            store = open_store({str(image_store)!r})
            record = Catalog(store.backend).get_image({IMAGE!r})
            mount_image({str(image_store)!r}, store, record, Path({str(m)!r}), None,
                        prefetch=False)
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        try:
            view = _view(m)
            assert view.prefetch is False
            assert (m / "etc/conf").read_bytes() == b"a=1\n"
            _wait_cached(view, "etc/conf")
            time.sleep(1)  # with prefetch, the walk would have cached the rest by now
            for rel in ("data/big", "data/small", "tree/sub/leaf"):
                assert not _cache_file(view, rel).exists(), rel
        finally:
            layerfs(image_store, "umount", str(m))


def _layerfs_without_password(store: Path, *args: str):
    import subprocess

    from tests.support.lfsmount import LAYERFS

    env = {k: v for k, v in os.environ.items() if k != "LAYERFS_PASSWORD_FILE"}
    return subprocess.run(
        [LAYERFS, "--store", str(store), *args], capture_output=True, text=True, env=env
    )


def test_a_mount_while_the_view_runs_asks_it_and_needs_no_password(image_store):
    """The running view daemon has the store open: `layerfs mount` asks it for the image's
    view over its control socket instead of opening the store (no key derived, no
    password needed); with no daemon running the store is opened, and must be."""
    from layerfs.fs.views import control_socket, daemon_dir

    with public_dir("kmount-") as base:
        (base / "m2").mkdir()
        refused = _layerfs_without_password(image_store, "mount", IMAGE, str(base / "m2"))
        assert refused.returncode == 1 and find_overlay(base / "m2") is None
        assert "password" in refused.stderr and len(refused.stderr.splitlines()) == 1
        with mounted(image_store, IMAGE, base / "m") as m:
            sock = control_socket(daemon_dir(image_store / "cache"))
            assert sock.is_socket() and stat.S_IMODE(sock.stat().st_mode) == 0o600
            done = _layerfs_without_password(
                image_store, "mount", IMAGE, str(base / "m2"), "--upper", str(base / "u")
            )
            assert done.returncode == 0, done.stderr
            try:
                assert _view(base / "m2").path == _view(m).path
                assert (base / "m2" / "data" / "small").read_bytes() == b"small\n"
                (base / "m2" / "new").write_text("kept in the upper\n")
                assert (base / "u" / "upper" / "new").read_text() == "kept in the upper\n"
                unknown = _layerfs_without_password(
                    image_store, "mount", "kmount/none:1", str(base / "m3")
                )
                assert unknown.returncode == 1
                assert "no image named 'kmount/none:1'" in unknown.stderr
            finally:
                layerfs(image_store, "umount", str(base / "m2"))


def test_the_view_answers_a_malformed_request_with_an_error_and_keeps_serving(image_store):
    import json
    import socket

    from layerfs.fs.views import control_socket, daemon_dir

    with public_dir("kmount-") as base, mounted(image_store, IMAGE, base / "m") as m:
        sock_path = control_socket(daemon_dir(image_store / "cache"))
        for request in (b"not json\n", b"[1, 2]\n", b'{"image": 7}\n'):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(str(sock_path))
                sock.sendall(request)
                reply = json.loads(sock.makefile("rb").readline())
            assert "error" in reply and "view" not in reply, (request, reply)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # goes mid-request
            sock.connect(str(sock_path))
            sock.sendall(b'{"image": "kmount')
        assert (m / "data" / "small").read_bytes() == b"small\n"
        with mounted(image_store, IMAGE, base / "m2") as m2:
            assert (m2 / "etc" / "conf").read_bytes() == b"a=1\n"

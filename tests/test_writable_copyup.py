"""Copy-up through real writable mounts: cheapness, hard links, inode numbers, disk format."""

from __future__ import annotations

import json
import os
import stat

import pytest

from layerfs.store.location import open_store
from tests.support.lfsmount import layerfs, public_dir
from tests.support.synthetic import f, make_image
from tests.support.writable import (
    BIG,
    FILES,
    IMAGE,
    image_mount,
)

pytestmark = pytest.mark.fuse
pytest_plugins = ["tests.support.writable_fixtures"]  # the `store` and `m` fixtures


def test_metadata_changes_copy_no_data(m):
    p = m.path / "big"
    os.chmod(p, 0o600)
    os.chown(p, 7, 8)
    os.utime(p, ns=(1, 2))
    os.setxattr(p, "user.tag", b"t")
    up = os.stat(m.upper / "big")
    assert up.st_size == len(BIG)
    assert up.st_blocks <= 8  # a placeholder: at most one block (xattrs), no data
    assert stat.S_IMODE(up.st_mode) == 0o600 and (up.st_uid, up.st_gid) == (7, 8)
    assert p.read_bytes() == BIG
    seen = os.stat(p)
    assert seen.st_blocks * 512 >= len(BIG)  # the mount shows the file as allocated


def test_whole_rewrite_drops_the_metacopy_xattr(m):
    with open(m.path / "etc" / "motd", "r+b") as fh:
        fh.write(b"Z" * len(FILES["etc/motd"]))
    assert "trusted.layerfs.metacopy" not in os.listxattr(m.upper / "etc" / "motd")
    assert (m.upper / "etc" / "motd").read_bytes() == b"Z" * len(FILES["etc/motd"])


def test_writing_one_name_of_a_lower_hard_link_copies_up_that_name(m):
    """Kernel overlayfs (as Docker's overlay2, without its inode index) copies up only the
    name written: the other name keeps the lower content."""
    h1, h2 = m.path / "hl1", m.path / "hl2"
    assert os.stat(h1).st_ino == os.stat(h2).st_ino and os.stat(h1).st_nlink == 2
    with open(h1, "ab") as fh:
        fh.write(b"tail")
    assert h1.read_bytes() == FILES["hl1"] + b"tail"
    assert h2.read_bytes() == FILES["hl1"]
    os.unlink(h2)
    assert h1.read_bytes() == FILES["hl1"] + b"tail"


def test_inode_numbers_stable_across_copy_up_and_remount(store):
    """Inode numbers survive copy-up and remount (xino). Hard links are left out: kernel
    overlayfs gives a copied-up hard link its upper inode, as Docker's overlay2 does."""
    names = ["etc/hello", "data/d1", "big"]
    with public_dir("lfsrw-") as base:
        with image_mount(store, base / "m", base / "c") as m:
            before = {n: os.stat(m.path / n).st_ino for n in names}
            os.chmod(m.path / "etc" / "hello", 0o600)
            (m.path / "data" / "d1" / "new").write_bytes(b"n")
            with open(m.path / "big", "r+b") as fh:
                fh.write(b"!")
            (m.path / "created").write_bytes(b"c")
            after = {n: os.stat(m.path / n).st_ino for n in names}
            created = os.stat(m.path / "created").st_ino
            os.rename(m.path / "etc" / "hello", m.path / "hello-moved")
            moved = os.stat(m.path / "hello-moved").st_ino
        assert after == before and moved == before["etc/hello"]
        with image_mount(store, base / "m", base / "c") as m:
            again = {n: os.stat(m.path / n).st_ino for n in names if n != "etc/hello"}
            assert again == {n: before[n] for n in again}
            assert os.stat(m.path / "created").st_ino == created
            assert os.stat(m.path / "hello-moved").st_ino == before["etc/hello"]


def test_changes_survive_remount(store):
    with public_dir("lfsrw-") as base:
        with image_mount(store, base / "m", base / "c") as m:
            (m.path / "etc" / "hello").write_bytes(b"changed")
            os.unlink(m.path / "data" / "keep")
            os.mkdir(m.path / "newdir")
            (m.path / "newdir" / "f").write_bytes(b"f")
            os.rename(m.path / "data" / "d1", m.path / "d1")
            os.symlink("x", m.path / "newlink")
        doc = json.loads((base / "c" / "layerfs.json").read_text())
        assert doc["image"] == IMAGE and doc["image_id"].startswith("sha256:")
        with image_mount(store, base / "m", base / "c") as m:
            p = m.path
            assert (p / "etc" / "hello").read_bytes() == b"changed"
            assert not (p / "data" / "keep").exists()
            assert (p / "newdir" / "f").read_bytes() == b"f"
            assert (p / "d1" / "sub" / "b").read_bytes() == FILES["data/d1/sub/b"]
            assert not (p / "data" / "d1").exists()
            assert os.readlink(p / "newlink") == "x"


def test_upper_of_another_image_is_refused(store, tmp_path):

    s = open_store(str(store))
    make_image(s, "lfsrw/other:1", [[f(s, "only", b"o")]])
    with public_dir("lfsrw-") as base:
        with image_mount(store, base / "m", base / "c"):
            pass
        (base / "m2").mkdir()
        proc = layerfs(
            store,
            "mount",
            "lfsrw/other:1",
            str(base / "m2"),
            "--upper",
            str(base / "c"),
            check=False,
        )
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and "another --upper" in proc.stderr
        assert not os.path.ismount(base / "m2")


def test_whiteout_and_opaque_on_disk(m):
    """overlayfs' whiteouts and opaque directories; a renamed lower directory is kept as
    a directory redirected to its old name (redirect_dir=on), its whiteouts with it."""
    p, u = m.path, m.upper
    os.unlink(p / "etc" / "hello")
    st = os.lstat(u / "etc" / "hello")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    for rel in ("data/d1/sub/b", "data/d1/a"):
        os.unlink(p / rel)
    os.rmdir(p / "data" / "d1" / "sub")
    os.rmdir(p / "data" / "d1")
    os.mkdir(p / "data" / "d1")
    assert os.getxattr(u / "data" / "d1", "trusted.overlay.opaque") == b"y"
    assert os.listdir(u / "data" / "d1") == []
    os.rename(p / "etc", p / "etc2")  # a lower directory
    assert stat.S_ISCHR(os.lstat(u / "etc").st_mode)
    assert os.getxattr(u / "etc2", "trusted.overlay.redirect") == b"etc"
    assert (p / "etc2" / "motd").read_bytes() == FILES["etc/motd"]
    assert not os.path.lexists(p / "etc2" / "hello")  # still deleted
    gone = os.lstat(u / "etc2" / "hello")  # the whiteout moved along with its directory
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.listdir(p / "etc2") == ["motd"]

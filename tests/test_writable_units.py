"""Unit tests of the writable mount's pure parts: byte ranges, mount(8) arguments, DirStack."""

from __future__ import annotations

import os
import stat

import pytest

from layerfs.dirstack import DirStack
from layerfs.fs.upper import MetaCopy
from layerfs.mounthelper import parse_args


def test_metacopy_ranges_merge_and_report_gaps():
    m = MetaCopy("big")
    m.add(100, 200)
    m.add(300, 400)
    assert m.missing(0, 500) == [(0, 100), (200, 300), (400, 500)]
    m.add(150, 320)
    assert m.ranges == [[100, 400]]
    assert m.covers(120, 390) and not m.covers(50, 150)
    assert m.missing(100, 400) == []
    assert MetaCopy.from_bytes(m.to_bytes()) == m


def test_mount_helper_arguments_as_mount_8_passes_them():
    args = parse_args(
        ["layerfs", "/mnt", "-n", "-o", "rw,noatime,lowerdir=/a:/b,upperdir=/u,workdir=/w"]
    )
    assert (args.source, args.mountpoint, args.readonly) == ("layerfs", "/mnt", False)
    assert args.options == {"lowerdir": "/a:/b", "upperdir": "/u", "workdir": "/w"}
    assert parse_args(["img", "/m", "-o", "ro,store=/s"]).readonly
    with pytest.raises(ValueError):
        parse_args(["/mnt"])
    with pytest.raises(ValueError):
        parse_args(["x", "/m", "-o", "lowerdir="])


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteout devices and trusted xattrs need root")
def test_dirstack_merges_with_overlayfs_rules(tmp_path):
    top, mid, bottom = tmp_path / "t", tmp_path / "m", tmp_path / "b"
    for layer in (top, mid, bottom):
        (layer / "d").mkdir(parents=True)
    (bottom / "d" / "a").write_text("bottom a")
    (bottom / "d" / "b").write_text("b")
    (bottom / "d" / "c").write_text("c")
    (bottom / "f").write_text("file below a dir")
    (mid / "d" / "a").write_text("mid a")
    (mid / "d" / ".wh.b").write_text("")
    os.mknod(top / "d" / "c", stat.S_IFCHR, 0)
    (top / "f").mkdir()
    view = DirStack([top, mid, bottom])
    assert sorted(view.listdir("d")) == ["a"]
    node = view.lookup("d/a")
    assert view.read(node, 0, 100) == b"mid a"
    assert view.lookup("d/b") is None and view.lookup("d/c") is None
    assert view.lookup("d/.wh.b") is None
    assert view.lookup("f").kind.value == "d" and view.listdir("f") == []
    assert view.lookup("d/a").ino != view.lookup("d").ino
    assert DirStack([top, mid, bottom]).lookup("d/a").ino == node.ino  # stable

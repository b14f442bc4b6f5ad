"""Unit tests of mount.fuse.layerfs: the arguments mount(8) passes."""

from __future__ import annotations

import pytest

from layerfs.mounthelper import parse_args


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

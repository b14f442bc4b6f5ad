"""The union vocabulary: OCI whiteout names, overlayfs whiteout devices, private xattrs."""

from __future__ import annotations

import os
import stat

import pytest

from layerfs.union.vocab import (
    WHITEOUT_MODE,
    WHITEOUT_RDEV,
    MemberName,
    NameKind,
    is_private_xattr,
    is_whiteout_stat,
    parse_member_name,
    whiteout_name,
)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("file", MemberName(NameKind.PLAIN)),
        ("..wh.x", MemberName(NameKind.PLAIN)),
        (".wh.gone", MemberName(NameKind.WHITEOUT, "gone")),
        (".wh..hidden", MemberName(NameKind.WHITEOUT, ".hidden")),
        (".wh..wh..opq", MemberName(NameKind.OPAQUE)),
        (".wh..wh.plnk", MemberName(NameKind.META)),
        (".wh..wh..opq2", MemberName(NameKind.META)),
    ],
)
def test_parse_member_name(base: str, expected: MemberName) -> None:
    assert parse_member_name(base) == expected


def test_whiteout_name_parses_back() -> None:
    assert whiteout_name("gone") == ".wh.gone"
    assert parse_member_name(whiteout_name("gone")) == MemberName(NameKind.WHITEOUT, "gone")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_whiteout_device(tmp_path) -> None:
    os.mknod(tmp_path / "w", WHITEOUT_MODE, WHITEOUT_RDEV)
    assert is_whiteout_stat(os.lstat(tmp_path / "w"))
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert not is_whiteout_stat(os.lstat(tmp_path / "null"))
    (tmp_path / "f").write_text("")
    assert not is_whiteout_stat(os.lstat(tmp_path / "f"))


def test_private_xattrs() -> None:
    assert is_private_xattr("trusted.overlay.opaque")
    assert is_private_xattr("trusted.layerfs.metacopy")
    assert not is_private_xattr("user.overlay.opaque")
    assert not is_private_xattr("security.capability")

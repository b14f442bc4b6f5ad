"""Incremental backups take unchanged files' entries from the parent, and only those.

A file whose content, mode, owner or xattrs change has a new ctime, so it is
read again and its new attributes are recorded; an untouched file keeps the
parent's entry as it was (without being read or asked for its xattrs). Runs on a
local store with the backup service's own code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layerfs.records import Kind, get_tree
from layerfs.store.location import open_store
from volplugin.backup import service

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


def _entries(store, record) -> dict:  # noqa: ANN001 - test helper
    return {e.path: e for e in get_tree(store, record.tree)[0]}


def test_attribute_changes_are_seen_and_untouched_files_reused(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    for name in ("same", "xattr", "mode", "owner", "linked"):
        (vol / name).write_bytes(name.encode() * 5000)
    os.setxattr(vol / "same", "user.keep", b"1")
    store = open_store(str(tmp_path / "store"))
    first = service.create_backup(store, "bkinc", vol)
    assert first.files_read == 5

    os.setxattr(vol / "xattr", "user.new", b"v")
    os.chmod(vol / "mode", 0o600)
    os.chown(vol / "owner", 1234, 5678)
    os.link(vol / "linked", vol / "second-name")
    second = service.create_backup(store, "bkinc", vol)
    assert second.parent == first.id
    assert second.files_read == 4  # all but "same"
    assert second.bytes_new == 0

    before, after = _entries(store, first), _entries(store, second)
    assert after["same"] == before["same"] and after["same"].xattrs == {"user.keep": b"1"}
    assert after["xattr"].xattrs == {"user.new": b"v"}
    assert after["mode"].mode == 0o600
    assert (after["owner"].uid, after["owner"].gid) == (1234, 5678)
    assert after["second-name"].kind is Kind.HARDLINK and after["second-name"].target == "linked"
    for name in ("xattr", "mode", "owner", "linked"):
        assert after[name].chunks == before[name].chunks

    third = service.create_backup(store, "bkinc", vol)
    assert third.files_read == 0
    assert _entries(store, third) == after

    target = tmp_path / "out"
    service.restore_backup(store, third.id, target)
    assert os.getxattr(target / "xattr", "user.new") == b"v"
    assert os.stat(target / "owner").st_uid == 1234
    assert os.stat(target / "second-name").st_ino == os.stat(target / "linked").st_ino
    assert (target / "same").read_bytes() == b"same" * 5000

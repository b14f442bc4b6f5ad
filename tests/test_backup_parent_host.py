"""An incremental backup's parent is the same host's last backup of the volume."""

from __future__ import annotations

from pathlib import Path

from layerfs.store import open_store
from volplugin.backup import service


def test_parent_is_this_hosts_last_backup(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    vol_a, vol_b = tmp_path / "a", tmp_path / "b"
    for vol in (vol_a, vol_b):
        vol.mkdir()
        (vol / "f").write_bytes(b"x" * 100_000)
    a1 = service.create_backup(store, "app_db", vol_a, host="host-a")
    b1 = service.create_backup(store, "app_db", vol_b, host="host-b")
    a2 = service.create_backup(store, "app_db", vol_a, host="host-a")
    assert (a1.parent, b1.parent, a2.parent) == (None, None, a1.id)
    assert b1.files_read == 1  # host-a's inode numbers say nothing about host-b's files
    assert a2.files_read == 0
    assert (a1.host, b1.host) == ("host-a", "host-b")

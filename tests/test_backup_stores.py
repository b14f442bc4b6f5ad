"""The backup life cycle through the Backend interface only, on every store kind.

Runs on the local store always, and on the real Ceph RGW when the test support
provides an ``s3_store_url`` fixture (a fresh s3:// URL per test).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from layerfs.records import get_tree
from layerfs.store.location import open_store
from tests.support.backuptree import describe, layerfs, make_tree, volplugin
from volplugin.backup import service

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices)")


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    try:
        return request.getfixturevalue("s3_store_url")
    except pytest.FixtureLookupError:
        pytest.skip("no s3_store_url fixture (Ceph RGW support) in this checkout")


def test_life_cycle(store_url: str, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    make_tree(vol)
    first = json.loads(
        volplugin("backup", "bk-life", "--path", str(vol), "--json", store=store_url).stdout
    )
    out1 = tmp_path / "out1"
    volplugin("restore", first["id"], "--to-dir", str(out1), store=store_url)
    assert describe(out1) == describe(vol)

    (vol / "data" / "text.log").write_bytes(b"new text\n" * 1000)
    second = json.loads(
        volplugin("backup", "bk-life", "--path", str(vol), "--json", store=store_url).stdout
    )
    assert second["files_read"] == 1 and second["parent"] == first["id"]
    diff = volplugin("diff", first["id"], second["id"], store=store_url).stdout
    assert diff.startswith("M data/text.log")

    volplugin("prune", "--keep-last", "1", "--grace", "0", store=store_url)
    store = open_store(store_url)
    assert [r.id for r in service.list_backups(store.backend)] == [second["id"]]
    volplugin("verify", "--read-data", store=store_url)
    out2 = tmp_path / "out2"
    volplugin("restore", second["id"][:10], "--to-dir", str(out2), store=store_url)
    assert describe(out2) == describe(vol)

    entries, _ = get_tree(store, second["tree"])
    big = next(e for e in entries if e.path == "data/big.bin")
    store.backend.delete_blobs([big.chunks[0].digest])
    proc = volplugin("verify", store=store_url, check=False)
    assert proc.returncode == 1 and "data/big.bin" in proc.stdout
    fsck = json.loads(layerfs("fsck", "--json", store=store_url, check=False).stdout)
    assert fsck["damage"] == [
        {
            "digest": big.chunks[0].digest,
            "problem": "missing",
            "detail": "referenced but not stored",
        }
    ]
    gc = json.loads(layerfs("gc", "--grace", "0", "--json", store=store_url).stdout)
    assert gc["removed"] == 0

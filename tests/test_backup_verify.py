"""`volplugin verify`: missing and damaged chunks are found and named by backup and path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from layerfs.records import get_tree
from layerfs.store.location import open_store
from tests.support.backuptree import volplugin
from tests.support.blobs import corrupt_blob, lose_blob
from volplugin.backup import service


@pytest.fixture
def two_backups(tmp_path: Path):
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
    (a / "sub" / "one").write_bytes(os.urandom(400_000))
    (b / "two").write_bytes(os.urandom(400_000))
    (b / "three").write_bytes(os.urandom(400_000))
    ra = service.create_backup(store, "bk-va", a)
    rb = service.create_backup(store, "bk-vb", b)
    return store_dir, ra, rb


def _chunk_of(store_dir: Path, tree: str, path: str) -> str:
    entries, _ = get_tree(open_store(str(store_dir)), tree)
    return next(e for e in entries if e.path == path).chunks[0].digest


def test_intact_backups_verify(two_backups) -> None:
    store_dir, _ra, _rb = two_backups
    out = volplugin("verify", "--read-data", store=store_dir).stdout
    assert "no damage found" in out
    report = json.loads(volplugin("verify", "--json", store=store_dir).stdout)
    assert report["ok"] and report["roots"] == 2 and report["checked"] == 0


def test_missing_chunk_found_without_reading_data(two_backups) -> None:
    store_dir, ra, rb = two_backups
    digest = _chunk_of(store_dir, rb.tree, "two")
    lose_blob(open_store(str(store_dir)).backend, digest)
    proc = volplugin("verify", store=store_dir, check=False)
    assert proc.returncode == 1
    assert f"backup {rb.id} (volume bk-vb)" in proc.stdout
    assert "  two" in proc.stdout.splitlines()
    assert ra.id not in proc.stdout
    assert "damage found" in proc.stderr
    volplugin("verify", "--volume", "bk-va", store=store_dir)


def test_damaged_chunk_found_only_by_reading(two_backups) -> None:
    store_dir, ra, _rb = two_backups
    digest = _chunk_of(store_dir, ra.tree, "sub/one")
    corrupt_blob(open_store(str(store_dir)).backend, digest, at=100, xor=1)
    volplugin("verify", store=store_dir)  # structure is fine
    proc = volplugin("verify", "--read-data", "--json", store=store_dir, check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["damage"][0]["digest"] == digest
    assert report["affected"] == [{"owner": f"backup {ra.id} (volume bk-va)", "paths": ["sub/one"]}]


def test_subset_reads_part_of_the_chunks(two_backups) -> None:
    store_dir, _ra, _rb = two_backups
    full = json.loads(volplugin("verify", "--read-data", "--json", store=store_dir).stdout)
    part = json.loads(
        volplugin("verify", "--read-data", "--subset", "1", "--json", store=store_dir).stdout
    )
    assert full["checked"] == full["referenced"]
    assert part["checked"] < full["checked"] // 2

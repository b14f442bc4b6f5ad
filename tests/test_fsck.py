"""`layerfs fsck` re-hashes every object and names the images, backups and paths damage hits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from layerfs.catalog import Catalog
from layerfs.records import get_tree, read_tree
from layerfs.store.location import open_store
from tests.support.backuptree import layerfs
from tests.support.blobs import corrupt_blob, lose_blob
from volplugin.backup import service


@pytest.fixture
def imported(tmp_path: Path, busybox_image: str):
    importer = pytest.importorskip("layerfs.importer")
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    image = importer.import_from_docker(store, busybox_image)
    return store_dir, image


def _busybox_chunk(store_dir: Path, image_name: str) -> str:
    store = open_store(str(store_dir))
    image = Catalog(store.backend).get_image(image_name)
    for layer in image.layers:
        entries, _ = get_tree(store, layer.tree)
        for e in entries:
            if e.path == "bin/busybox" and e.chunks:
                return e.chunks[len(e.chunks) // 2].digest
    raise AssertionError("no bin/busybox with chunks in the image")


def test_clean_store_passes(imported) -> None:
    store_dir, image = imported
    out = layerfs("fsck", store=store_dir).stdout
    assert "no damage found" in out


def test_corrupt_object_names_image_backup_and_paths(imported, tmp_path: Path) -> None:
    store_dir, image = imported
    vol = tmp_path / "vol"
    vol.mkdir()
    shutil.copy("/bin/busybox", vol / "tool")
    backup = service.create_backup(open_store(str(store_dir)), "bk-fsck", vol)
    digest = _busybox_chunk(store_dir, image.name)
    corrupt_blob(open_store(str(store_dir)).backend, digest, at=-1, xor=0x55)
    proc = layerfs("fsck", store=store_dir, check=False)
    assert proc.returncode == 1
    assert f"damaged object {digest}: corrupt" in proc.stdout
    assert f"image {image.name}" in proc.stdout and "bin/busybox" in proc.stdout
    report = json.loads(layerfs("fsck", "--json", store=store_dir, check=False).stdout)
    assert not report["ok"]
    affected = {a["owner"]: a["paths"] for a in report["affected"]}
    assert affected[f"image {image.name}"] == ["bin/busybox"]
    assert affected[f"backup {backup.id} (volume bk-fsck)"] == ["tool"]
    assert [d["digest"] for d in report["damage"]] == [digest]


def test_missing_tree_and_corrupt_orphan(imported) -> None:
    store_dir, image = imported
    store = open_store(str(store_dir))
    orphan = store.write_bytes(os.urandom(50_000))[0].digest
    store.flush()
    corrupt_blob(store.backend, orphan, at=-1, xor=0x55)
    tree = image.layers[-1].tree
    lose_blob(store.backend, tree)
    report = json.loads(layerfs("fsck", "--json", store=store_dir, check=False).stdout)
    damage = {d["digest"]: d["problem"] for d in report["damage"]}
    assert damage == {orphan: "corrupt", tree: "missing"}
    affected = {a["owner"]: a["paths"] for a in report["affected"]}
    assert affected[f"image {image.name}"] == ["(tree record)"]


def test_a_corrupt_directory_node_names_every_backup_that_shares_it(
    imported, tmp_path: Path
) -> None:
    """Marking reads a node two backups share once; fsck still names both, and the
    directory whose node is damaged."""
    store_dir, _image = imported
    vol = tmp_path / "vol"
    (vol / "sub").mkdir(parents=True)
    (vol / "sub" / "file").write_text("in a subdirectory\n")
    store = open_store(str(store_dir))
    first = service.create_backup(store, "bk-node", vol)
    (vol / "top").write_text("a change outside sub/\n")
    second = service.create_backup(store, "bk-node", vol)
    node = read_tree(store, first.tree).records[-1]  # the node of sub/
    assert node in read_tree(store, second.tree).records
    corrupt_blob(store.backend, node)
    report = json.loads(layerfs("fsck", "--json", store=store_dir, check=False).stdout)
    damage = {d["digest"]: d["problem"] for d in report["damage"]}
    assert damage == {node: "corrupt"}
    affected = {a["owner"]: a["paths"] for a in report["affected"]}
    assert affected == {f"backup {b.id} (volume bk-node)": ["sub"] for b in (first, second)}

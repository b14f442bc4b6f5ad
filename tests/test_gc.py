"""`layerfs gc` on a real local store: orphans go, referenced and fresh objects stay."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from layerfs.catalog import Catalog
from layerfs.errors import StoreError
from layerfs.maintenance import all_roots, collect_garbage
from layerfs.records import get_tree, read_content
from layerfs.store.location import open_store
from tests.support import dockerenv, images
from tests.support.backuptree import layerfs, make_image
from tests.support.blobs import age_blob, lose_blob
from volplugin.backup import service


def _blobs(store_dir: Path) -> dict[str, int]:
    return dict(open_store(str(store_dir)).backend.iter_blobs())


@pytest.fixture
def populated(tmp_path: Path):
    """A store with one image, one backup, old orphans, one fresh orphan and temp leftovers."""
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    (img_dir / "lib.so").write_bytes(os.urandom(300_000))
    image = make_image(store, "bk-image:1", img_dir)
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "db").write_bytes(os.urandom(500_000))
    backup = service.create_backup(store, "bk-gc", vol)
    referenced = set(_blobs(store_dir))
    old = store.write_bytes(os.urandom(200_000))
    store.flush()  # a pack of their own: the fresh ones must not share its age
    fresh = store.write_bytes(os.urandom(70_000))
    store.flush()
    for digest in {ref.digest for ref in old} | referenced:
        age_blob(store.backend, digest, 7200)
    (store_dir / "tmp" / "w-killed").write_bytes(b"half a chunk")
    (store_dir / "cache" / "maintenance").mkdir(parents=True, exist_ok=True)
    (store_dir / "cache" / "maintenance" / "liveset-killed.sqlite").write_bytes(b"x")
    return store_dir, image, backup, referenced, {r.digest for r in old}, {r.digest for r in fresh}


def test_gc_frees_orphans_only(populated, tmp_path: Path) -> None:
    store_dir, image, backup, referenced, old, fresh = populated
    before = _blobs(store_dir)
    dry = json.loads(layerfs("gc", "--dry-run", "--json", store=store_dir).stdout)
    assert dry["removed"] == len(old) and _blobs(store_dir) == before
    report = json.loads(layerfs("gc", "--json", store=store_dir).stdout)
    assert report["removed"] == len(old)
    assert report["freed_bytes"] == sum(before[d] for d in old)
    assert report["kept_fresh"] == len(fresh)
    assert report["tmp_cleaned"] == 1
    after = set(_blobs(store_dir))
    assert after == referenced | fresh
    assert os.listdir(store_dir / "tmp") == []
    assert os.listdir(store_dir / "cache" / "maintenance") == []
    layerfs("fsck", store=store_dir)
    store = open_store(str(store_dir))
    entries, _ = get_tree(store, Catalog(store.backend).get_image("bk-image:1").layers[0].tree)
    lib = next(e for e in entries if e.path == "lib.so")
    assert read_content(store, lib) == (tmp_path / "img" / "lib.so").read_bytes()
    service.restore_backup(store, backup.id, tmp_path / "out")
    assert (tmp_path / "out" / "db").read_bytes() == (tmp_path / "vol" / "db").read_bytes()
    text = layerfs("gc", "--grace", "0", store=store_dir).stdout
    assert f"removed {len(fresh)} objects" in text
    assert set(_blobs(store_dir)) == referenced


def test_rmi_then_gc_frees_the_image(populated) -> None:
    store_dir, image, _backup, referenced, _old, _fresh = populated
    layerfs("rmi", image.name, store=store_dir)
    store = open_store(str(store_dir))
    assert store.backend.list_docs("layers/") == []  # its last image is gone
    layerfs("gc", "--grace", "0", store=store_dir)
    left = set(_blobs(store_dir))
    assert image.layers[0].tree not in left
    assert left < referenced
    layerfs("fsck", store=store_dir)


def test_rmi_keeps_layers_other_images_use_and_gc_frees_the_rest(
    docker_client, tmp_path: Path
) -> None:
    """Two real images sharing busybox's layer: removing one frees only its own layer,
    removing both frees everything, and a new import stores the layers again."""
    base = dockerenv.ensure_busybox_image(docker_client)
    small = images.build_small_image(docker_client)
    base_tar = images.docker_save(base, tmp_path / "base.tar")
    small_tar = images.docker_save(small, tmp_path / "small.tar")
    store_dir = tmp_path / "store"
    layerfs("import", str(base_tar), store=store_dir)
    layerfs("import", str(small_tar), store=store_dir)
    catalog = Catalog(open_store(str(store_dir)).backend)
    base_rec, small_rec = catalog.get_image(base), catalog.get_image(small)
    shared = {layer.diff_id for layer in base_rec.layers}
    assert shared < {layer.diff_id for layer in small_rec.layers}
    full = _blobs(store_dir)
    out = layerfs("rmi", small, store=store_dir).stdout
    assert f"and {len(small_rec.layers) - len(shared)} of its" in out
    assert len(catalog.backend.list_docs("layers/")) == len(shared)
    layerfs("gc", "--grace", "0", store=store_dir)
    after_one = _blobs(store_dir)
    assert set(after_one) < set(full)
    assert all(layer.tree in after_one for layer in base_rec.layers)
    layerfs("fsck", store=store_dir)
    layerfs("rmi", base, store=store_dir)
    layerfs("gc", "--grace", "0", store=store_dir)
    assert _blobs(store_dir) == {}
    layerfs("import", str(small_tar), store=store_dir)
    layerfs("fsck", store=store_dir)
    again = Catalog(open_store(str(store_dir)).backend).get_image(small)
    assert all(layer.tree in _blobs(store_dir) for layer in again.layers)


def test_gc_stops_when_a_tree_is_unreadable(populated) -> None:
    store_dir, _image, backup, _ref, old, _fresh = populated
    store = open_store(str(store_dir))
    lose_blob(store.backend, backup.tree)
    proc = layerfs("gc", "--grace", "0", store=store_dir, check=False)
    assert proc.returncode == 1
    assert backup.id in proc.stderr and "fsck" in proc.stderr
    assert old <= set(_blobs(store_dir))


def test_gc_waits_for_writers(populated) -> None:
    store_dir, *_rest, old, _fresh = populated
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from layerfs.store.location import open_backend\n"
            f"with open_backend({str(store_dir)!r}).lock(exclusive=False):\n"
            "    print('locked', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = open_store(str(store_dir))
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (
                collect_garbage(
                    store, functools.partial(all_roots, store.backend), grace_seconds=0
                ),
                done.set(),
            )
        )
        worker.start()
        worker.join(1.0)
        assert not done.is_set(), "gc ran while a writer held the shared lock"
        assert old <= set(_blobs(store_dir))
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait()
    worker.join()
    assert done.is_set()
    assert not old & set(_blobs(store_dir))


def test_unreadable_doc_is_a_clear_error(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    store.backend.put_doc("backups/broken.json", b"{not json")
    with pytest.raises(StoreError, match="backups/broken.json"):
        collect_garbage(store, functools.partial(all_roots, store.backend))

"""Damaged and hostile archives are refused whole; a killed import leaves the store usable."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from layerfs.catalog import Catalog
from layerfs.content.cache import ContentCache, content_id
from layerfs.importer import import_archive
from layerfs.index.build import pack_chunks
from layerfs.records import Kind, get_tree, read_content
from layerfs.store import open_store
from tests.support import images
from tests.test_import import LAYERFS, cached_contents, layerfs, listed

pytestmark = pytest.mark.docker


@pytest.fixture(scope="session")
def good(docker_client, tmp_path_factory) -> dict[str, Path]:
    feature = images.build_feature_image(docker_client)
    small = images.build_small_image(docker_client)
    d = tmp_path_factory.mktemp("lfsimp-bad")
    legacy = images.docker_save(feature, d / "feature.tar")
    images.skopeo_copy(f"docker-archive:{legacy}", f"oci:{d / 'oci'}:lfsimp/feature:oci")
    return {"legacy": legacy, "oci": d / "oci", "small": images.docker_save(small, d / "s.tar")}


@pytest.fixture
def store(good, tmp_path: Path) -> Path:
    """A store already holding lfsimp/small:latest."""
    path = tmp_path / "store"
    import_archive(open_store(str(path)), good["small"])
    return path


def assert_refused(store: Path, archive: Path, *needles: str) -> str:
    proc = layerfs(store, "import", str(archive), "--tag", "lfsimp/bad")
    assert proc.returncode == 1, proc.stdout
    message = proc.stderr.strip()
    assert "\n" not in message and message.startswith("layerfs: error: ")
    for needle in needles:
        assert needle in message
    assert_only_small(store)
    tmp = store / "cache" / "content" / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())  # the refused files' bytes are gone
    return message


def assert_only_small(store: Path) -> None:
    """Nothing but the small image is listed, all of its objects read back verified, and
    the content cache names nothing (the small image was imported without it)."""
    assert set(listed(store)) == {"lfsimp/small:latest"}
    assert cached_contents(store) == {}
    cs = open_store(str(store))
    for layer in Catalog(cs.backend).get_image("lfsimp/small").layers:
        for entry in get_tree(cs, layer.tree)[0]:
            for ref in entry.chunks:
                assert len(cs.get_chunk(ref.digest)) == ref.size


def unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest)  # noqa: S202 - our own docker save output
    return dest


def edit_legacy_layer(good: dict, tmp: Path, index: int, edit, fix_config: bool = True) -> Path:
    """Rewrite layer ``index`` of the legacy archive; update its DiffID unless told not to."""
    work = unpack(good["legacy"], tmp / "unpacked")
    manifest = json.loads((work / "manifest.json").read_text())
    layer = work / manifest[0]["Layers"][index]
    data = edit(layer.read_bytes())
    layer.unlink()
    layer.write_bytes(data)
    if fix_config:
        config = json.loads((work / manifest[0]["Config"]).read_text())
        config["rootfs"]["diff_ids"][index] = "sha256:" + hashlib.sha256(data).hexdigest()
        raw = json.dumps(config).encode()
        (work / manifest[0]["Config"]).unlink()
        manifest[0]["Config"] = hashlib.sha256(raw).hexdigest() + ".json"
        (work / manifest[0]["Config"]).write_bytes(raw)
        (work / "manifest.json").write_text(json.dumps(manifest))
    return images.tar_dir(work, tmp / "edited.tar")


def add_member(info: tarfile.TarInfo, content: bytes = b""):
    """An edit appending one member to a layer tar (after its real members)."""

    def edit(data: bytes) -> bytes:
        out = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(data), errors="surrogateescape") as src,
            tarfile.open(
                fileobj=out, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape"
            ) as dst,
        ):
            for m in src:
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
            info.size = len(content)
            dst.addfile(info, io.BytesIO(content))
        return out.getvalue()

    return edit


@pytest.mark.parametrize(
    ("name", "linkname"),
    [("feat/../../evil", ""), ("/etc/evil", ""), ("feat/dangling-link", "feat/nothing/here")],
)
def test_hostile_entries_are_refused(good, store, tmp_path, name: str, linkname: str) -> None:
    info = tarfile.TarInfo(name)
    if linkname:
        info.type, info.linkname = tarfile.LNKTYPE, linkname
    archive = edit_legacy_layer(good, tmp_path, 2, add_member(info))
    message = assert_refused(store, archive, "layer 3 (", repr(name))
    if linkname:
        assert "neither earlier in this layer nor in a lower layer" in message


def test_diff_id_mismatch_is_refused(good, store, tmp_path) -> None:
    def flip(data: bytes) -> bytes:
        at = data.index(b"z\n")  # the content of feat/opq/z
        return data[:at] + b"Z" + data[at + 1 :]

    archive = edit_legacy_layer(good, tmp_path, 2, flip, fix_config=False)
    assert_refused(store, archive, "layer 3 (", "hashes to sha256:", "image config says")


def test_truncated_layer_is_refused(good, store, tmp_path) -> None:
    archive = edit_legacy_layer(good, tmp_path, 1, lambda data: data[: len(data) // 2])
    assert_refused(store, archive, "layer 2 (", "truncated", "at entry 'feat/")


def test_truncated_or_garbage_archive_is_refused(good, store, tmp_path) -> None:
    data = good["legacy"].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert_refused(store, cut)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(100_000))
    assert_refused(store, junk, "not a readable image archive")


def test_blob_digest_mismatch_is_refused(good, store, tmp_path) -> None:
    layout = shutil.copytree(good["oci"], tmp_path / "oci")
    _index, manifest = images.oci_manifest(layout)
    blob = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[4:8] = b"\x01\x02\x03\x04"  # the gzip header's mtime: same layer, other blob digest
    assert gzip.decompress(bytes(data))
    blob.write_bytes(bytes(data))
    assert_refused(store, layout, "layer 2 (blobs/sha256/", "layer blob hashes to")


def test_unknown_media_type_is_refused(good, store, tmp_path) -> None:
    layout = shutil.copytree(good["oci"], tmp_path / "oci")
    index, manifest = images.oci_manifest(layout)
    manifest["layers"][3]["mediaType"] = "application/vnd.example.layer.v9+brotli"
    images.oci_set_manifest(layout, index, manifest)
    assert_refused(store, layout, "layer 4 (blobs/sha256/", "unknown layer media type")


@pytest.mark.slow
def test_killed_import_leaves_a_usable_store(docker_client, store, tmp_path) -> None:
    tag = images.build_large_image(docker_client)
    try:
        archive = images.docker_save(tag, tmp_path / "large.tar")
    finally:
        images.remove_images(docker_client, [tag])
    env = dict(os.environ, LAYERFS_STORE=str(store))
    packs = store / "packs"
    before = sum(len(f) for _, _, f in os.walk(packs))
    proc = subprocess.Popen([LAYERFS, "import", str(archive)], env=env, stderr=subprocess.DEVNULL)
    while proc.poll() is None and sum(len(f) for _, _, f in os.walk(packs)) - before < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the import finished before it could be killed"
    assert_only_small(store)
    cache = ContentCache(store / "cache" / "content")
    assert cache.clean_temp() > 0  # what it had written of files, left as temp files only
    assert not list((store / "cache" / "content" / "tmp").iterdir())
    cs = open_store(str(store))
    for digest, _size in cs.backend.iter_blobs():
        cs.get_chunk(digest)  # raises if a stored blob is partial or corrupt
    proc2 = layerfs(store, "import", str(archive))
    assert proc2.returncode == 0, proc2.stderr
    rows = listed(store)
    assert rows["lfsimp/large:latest"]["layers"] == 5
    image = Catalog(cs.backend).get_image("lfsimp/large")
    top = {e.path: e for e in get_tree(cs, image.layers[4].tree)[0]}
    assert top["large3"].kind is Kind.FILE and top["large3"].size == 48 << 20
    cached = cached_contents(store)
    assert cached[content_id(pack_chunks(top["large3"].chunks), None)] == read_content(
        cs, top["large3"]
    )

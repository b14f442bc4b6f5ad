"""Importing real Docker images through every archive layout, by the CLI and the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.catalog import Catalog, ImageRecord
from layerfs.content.cache import content_id
from layerfs.importer import import_archive
from layerfs.index.build import pack_chunks
from layerfs.records import Entry, Kind, get_tree, read_content
from layerfs.store import open_store
from layerfs.store.chunks import ChunkStore
from tests.support import images
from tests.support.repos import same_key_store

pytestmark = pytest.mark.docker

LAYERFS = str(Path(sys.executable).parent / "layerfs")


def layerfs(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LAYERFS_STORE=str(store))
    return subprocess.run([LAYERFS, *args], capture_output=True, text=True, env=env)


def listed(store: Path) -> dict[str, dict]:
    proc = layerfs(store, "images", "--json")
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


@pytest.fixture(scope="session")
def archives(docker_client, tmp_path_factory) -> dict[str, Path]:
    """The feature image in every layout the importer understands."""
    tag = images.build_feature_image(docker_client)
    d = tmp_path_factory.mktemp("lfsimp-archives")
    legacy = images.docker_save(tag, d / "feature.tar")
    src = f"docker-archive:{legacy}"
    images.skopeo_copy(src, f"oci-archive:{d / 'oci.tar'}:lfsimp/feature:oci")
    images.skopeo_copy(src, f"oci:{d / 'oci-dir'}:lfsimp/feature:ocidir")
    images.skopeo_copy(src, f"oci:{d / 'oci-zstd'}:lfsimp/feature:zstd", zstd=True)
    d25 = images.make_docker25_archive(d / "oci-dir", d / "d25.tar", "lfsimp/feature:d25")
    return {
        "legacy": legacy,
        "oci-archive": d / "oci.tar",
        "oci-dir": d / "oci-dir",
        "oci-zstd": d / "oci-zstd",
        "docker25": d25,
    }


def layer_entries(store: ChunkStore, image: ImageRecord, index: int) -> dict[str, Entry]:
    entries, meta = get_tree(store, image.layers[index].tree)
    assert meta["diff_id"] == image.layers[index].diff_id
    return {e.path: e for e in entries}


def check_feature_layers(store: ChunkStore, image: ImageRecord) -> None:
    """What the feature image's layers must hold (see tests/support/images.py)."""
    assert len(image.layers) == 4
    base = layer_entries(store, image, 0)
    assert base["bin/busybox"].kind is Kind.FILE and base["bin/busybox"].chunks
    one = layer_entries(store, image, 1)
    assert one["feat/modes/setuid"].mode == 0o4755
    assert one["feat/modes/setgid"].mode == 0o2711
    assert one["feat/modes/sticky"].kind is Kind.DIR and one["feat/modes/sticky"].mode == 0o1777
    assert one["feat/dev/char"].kind is Kind.CHAR and one["feat/dev/char"].rdev == (1, 3)
    assert one["feat/dev/block"].kind is Kind.BLOCK and one["feat/dev/block"].rdev == (7, 0)
    assert one["feat/dev/fifo"].kind is Kind.FIFO
    assert one["feat/names/rel-sym"].target == "../hl/orig"
    assert one["feat/names/dangling"].kind is Kind.SYMLINK
    assert read_content(store, one["feat/names/with space"]) == b"sp\n"
    assert read_content(store, one[f"feat/names/{images.UTF8_NAME}"]) == b"u\n"
    assert read_content(store, one[f"feat/names/{images.LONG_NAME}"]) == b"long\n"
    assert (one["feat/owned"].uid, one["feat/owned"].gid) == (1234, 5678)
    assert one["feat/empty"].inline == b"" and one["feat/empty"].size == 0
    big = one["feat/data/big"]
    assert big.size == 1536 * 1024 and big.inline is None and len(big.chunks) > 1
    links = [e for e in one.values() if e.path.startswith("feat/hl/")]
    assert sorted(e.kind.value for e in links) == ["f", "h", "h"]  # one file, two links to it
    two = layer_entries(store, image, 2)
    assert two["feat/del/a"].kind is Kind.WHITEOUT
    assert two["feat/hl/gone"].kind is Kind.WHITEOUT
    layer2 = get_tree(store, image.layers[2].tree)[0]
    assert [e.kind for e in layer2 if e.path == "feat/opq"] == [Kind.DIR, Kind.OPAQUE]
    assert two["feat/opq/z"].kind is Kind.FILE
    assert two["feat/hl/upper"].kind is Kind.HARDLINK
    assert two["feat/hl/upper"].target == "feat/hl/orig"
    assert two["feat/data/big-copy"].chunks == big.chunks
    assert image.layers[2].stored_bytes < 100_000 or image.added_bytes == 0  # the copy is free
    three = layer_entries(store, image, 3)
    assert three[images.FEATURE_XATTR_FILE].xattrs == {
        "security.capability": images.FEATURE_CAPABILITY
    }
    odd = "feat/xa/" + images.FEATURE_NON_UTF8_NAME.decode("utf-8", "surrogateescape")
    assert read_content(store, three[odd]) == b"non-utf8 name\n"


def test_docker_save_legacy(archives, tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = layerfs(store, "import", str(archives["legacy"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress display when stderr is not a terminal
    row = listed(store)["lfsimp/feature:latest"]
    assert row["layers"] == 4 and row["apparent_size"] > 1536 * 1024 * 2
    cs = open_store(str(store))
    image = Catalog(cs.backend).get_image("lfsimp/feature:latest")
    check_feature_layers(cs, image)
    assert image.id == row["id"]


def cached_contents(store: Path) -> dict[str, bytes]:
    """Content ID -> bytes of every content in a local store's content cache."""
    data = store / "cache" / "content" / "data"
    files = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    assert all(p.stat().st_mode & 0o777 == 0o444 for p in files)
    return {p.name: p.read_bytes() for p in files}


def test_an_import_puts_every_file_into_the_content_cache(archives, tmp_path: Path) -> None:
    """The bytes an import reads go into the content cache, each content once, named by the
    ID the image's metadata tree points at; --no-cache leaves the cache to the first mount."""
    store = tmp_path / "store"
    assert layerfs(store, "import", str(archives["legacy"])).returncode == 0
    cs = open_store(str(store))
    image = Catalog(cs.backend).get_image("lfsimp/feature:latest")
    wanted: dict[str, bytes] = {}
    for layer in image.layers:
        for e in get_tree(cs, layer.tree)[0]:
            if e.kind is Kind.FILE and e.size:
                packed = pack_chunks(e.chunks) if e.inline is None else None
                wanted[content_id(packed, e.inline)] = read_content(cs, e)
    assert len(wanted) >= 20
    assert cached_contents(store) == wanted
    assert not list((store / "cache" / "content" / "tmp").iterdir())
    # the image's index and metadata tree are built too: its first mount finds them
    assert [p.suffix for p in (store / "cache" / "index").iterdir()] == [".sqlite"]
    (meta,) = (store / "cache" / "meta").iterdir()
    redirects = {
        os.getxattr(p, "trusted.overlay.redirect").decode().rsplit("/", 1)[-1]
        for p in meta.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size
    }
    assert len(redirects) >= 15 and redirects <= set(wanted)  # the merged tree's files
    # a second name for the same layers reads nothing, so it writes nothing
    assert layerfs(store, "import", str(archives["oci-zstd"])).returncode == 0
    assert cached_contents(store) == wanted
    bare = tmp_path / "bare"
    proc = layerfs(bare, "import", "--no-cache", str(archives["legacy"]))
    assert proc.returncode == 0, proc.stderr
    assert cached_contents(bare) == {}
    assert not (bare / "cache" / "meta").exists()


@pytest.mark.parametrize(
    ("blocked", "warning"),
    [
        ("content", "the content cache cannot be written"),
        ("meta", "the image's index is built at its first mount, not now"),
    ],
)
def test_an_import_goes_on_when_its_head_start_cannot_be_written(
    archives, tmp_path: Path, blocked: str, warning: str
) -> None:
    """Filling the content cache and building the index and metadata tree are only a head
    start for the first mount: when either cannot be written, the import still succeeds,
    with one warning, and leaves that to the first mount."""
    store = tmp_path / "store"
    assert layerfs(store, "init").returncode == 0
    (store / "cache").mkdir(exist_ok=True)
    (store / "cache" / blocked).write_text("a file where the cache's directory goes")
    proc = layerfs(store, "import", str(archives["legacy"]))
    assert proc.returncode == 0, proc.stderr
    assert warning in proc.stderr
    assert proc.stderr.count("\n") == 1  # said once, not per file
    assert "lfsimp/feature:latest" in listed(store)
    if blocked == "meta":
        assert cached_contents(store)  # the contents went into the cache all the same


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("oci-archive", "lfsimp/feature:oci"),
        ("oci-dir", "lfsimp/feature:ocidir"),
        ("oci-zstd", "lfsimp/feature:zstd"),
        ("docker25", "lfsimp/feature:d25"),
    ],
)
def test_oci_layouts_give_the_same_layers(archives, tmp_path: Path, layout: str, name: str):
    legacy = import_archive(open_store(str(tmp_path / "legacy")), archives["legacy"])
    store = same_key_store(tmp_path / "legacy", tmp_path / layout)  # equal content, equal IDs
    image = import_archive(store, archives[layout])
    assert image.name == name
    check_feature_layers(store, image)
    assert [layer.diff_id for layer in image.layers] == [la.diff_id for la in legacy.layers]
    assert [layer.tree for layer in image.layers] == [la.tree for la in legacy.layers]
    if layout == "oci-zstd":
        _index, manifest = images.oci_manifest(archives[layout])
        assert {d["mediaType"] for d in manifest["layers"]} == {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        }


def test_second_import_adds_nothing(archives, tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    first = import_archive(store, archives["legacy"])
    assert first.added_bytes > 1536 * 1024
    blobs = sorted(store.backend.iter_blobs())
    again = import_archive(store, archives["legacy"], tag="lfsimp/again")
    oci = import_archive(store, archives["oci-zstd"])
    assert again.added_bytes == 0 and oci.added_bytes == 0
    assert sorted(store.backend.iter_blobs()) == blobs
    assert again.name == "lfsimp/again:latest"
    rows = listed(tmp_path / "store")
    # the three names share every blob except the configs' (which are docs, not blobs)
    assert all(row["unique_bytes"] == 0 for row in rows.values())
    assert layerfs(tmp_path / "store", "rmi", "lfsimp/again").returncode == 0
    assert layerfs(tmp_path / "store", "rmi", "lfsimp/feature:zstd").returncode == 0
    rows = listed(tmp_path / "store")
    assert list(rows) == ["lfsimp/feature:latest"]
    on_disk = sum(size for _d, size in store.backend.iter_blobs())
    assert rows["lfsimp/feature:latest"]["unique_bytes"] == on_disk


def test_from_docker_and_listing(docker_client, archives, tmp_path: Path) -> None:
    tag = images.build_small_image(docker_client)
    store = tmp_path / "store"
    proc = layerfs(store, "import", "--from-docker", tag)
    assert proc.returncode == 0, proc.stderr
    assert "imported lfsimp/small:latest" in proc.stdout
    assert layerfs(store, "import", str(archives["oci-archive"])).returncode == 0
    rows = listed(store)
    assert set(rows) == {"lfsimp/small:latest", "lfsimp/feature:oci"}
    small, feature = rows["lfsimp/small:latest"], rows["lfsimp/feature:oci"]
    assert small["layers"] == 2 and feature["layers"] == 4
    # the busybox base layer is shared: neither image alone adds it
    assert 0 < small["unique_bytes"] < 10_000
    assert feature["unique_bytes"] > 1536 * 1024
    cs = open_store(str(store))
    image = Catalog(cs.backend).get_image("lfsimp/small")
    top = layer_entries(cs, image, 1)
    assert read_content(cs, top["small.txt"]) == b"small\n"
    assert image.id == docker_client.images.get(tag).id
    text = layerfs(store, "images")
    assert text.returncode == 0 and "lfsimp/small:latest" in text.stdout
    proc = layerfs(store, "rmi", "lfsimp/small")
    assert proc.returncode == 0 and "removed lfsimp/small:latest" in proc.stdout
    assert set(listed(store)) == {"lfsimp/feature:oci"}
    proc = layerfs(store, "rmi", "lfsimp/small")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no image named" in proc.stderr


def test_unnamed_image_needs_a_tag(archives, tmp_path: Path) -> None:
    layout = tmp_path / "unnamed"
    shutil.copytree(archives["oci-dir"], layout)
    index = json.loads((layout / "index.json").read_text())
    del index["manifests"][0]["annotations"]
    (layout / "index.json").write_text(json.dumps(index))
    store = tmp_path / "store"
    proc = layerfs(store, "import", str(layout))
    assert proc.returncode == 1 and "--tag" in proc.stderr
    assert listed(store) == {}
    proc = layerfs(store, "import", str(layout), "--tag", "lfsimp/named:v1")
    assert proc.returncode == 0, proc.stderr
    assert set(listed(store)) == {"lfsimp/named:v1"}


def test_progress_is_shown_on_a_terminal(archives, tmp_path: Path) -> None:
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, LAYERFS_STORE=str(tmp_path / "store"), COLUMNS="120")
    proc = subprocess.Popen(
        [LAYERFS, "import", str(archives["legacy"])], stderr=slave, stdout=subprocess.PIPE, env=env
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert proc.wait() == 0
    assert b"layer " in shown and b"/4" in shown

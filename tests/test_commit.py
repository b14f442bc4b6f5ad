"""`commit` records a layer and an image only after their content is durable, even
when killed; the config, DiffID and ChainID follow the image spec."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerfs.catalog import Catalog
from layerfs.commit import MountChanges, NothingToCommit, commit, normalize_tag
from layerfs.imageconfig import chain_ids, committed_config, config_bytes, image_id
from layerfs.layertar import write_layer
from layerfs.records import get_tree
from layerfs.store.location import open_store
from tests.support.lfscommit import image_from_dir, overlay_mount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "data").mkdir()
    (root / "data/blob").write_bytes(os.urandom(300_000))
    return root


def test_chain_ids_follow_the_spec() -> None:
    a, b, c = ("sha256:" + hashlib.sha256(x).hexdigest() for x in (b"a", b"b", b"c"))
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]


def test_config_bytes_like_go_and_commit_config() -> None:
    base = {"config": {"Env": ["A=<&>"], "Labels": {"é": "\u2028"}}, "rootfs": {"diff_ids": ["x"]}}
    assert config_bytes(base) == (
        b'{"config":{"Env":["A=\\u003c\\u0026\\u003e"],"Labels":{"\xc3\xa9":"\\u2028"}},'
        b'"rootfs":{"diff_ids":["x"]}}'
    )
    new = committed_config({**base, "container": "c"}, "y", "T", "layerfs commit", "msg", "me")
    assert new["rootfs"] == {"diff_ids": ["x", "y"], "type": "layers"}
    assert new["history"] == [
        {"created": "T", "created_by": "layerfs commit", "author": "me", "comment": "msg"}
    ]
    assert "container" not in new and base["rootfs"]["diff_ids"] == ["x"]
    assert image_id(new) == "sha256:" + hashlib.sha256(config_bytes(new)).hexdigest()
    assert normalize_tag("a/b") == "a/b:latest" and normalize_tag("h:5000/a:1") == "h:5000/a:1"


@needs_root
def test_commit_records_layer_and_image(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    base = image_from_dir(store, _root(tmp_path), "lfscommit/base:1")
    with overlay_mount(tmp_path / "root", tmp_path / "ov") as (mnt, upper):
        changes = MountChanges(mnt, upper, base)
        with pytest.raises(NothingToCommit, match="nothing to commit"):
            commit(store, changes, "lfscommit/none")
        with open(mnt / "etc/passwd", "a") as f:
            f.write("alice:x:1000:1000::/home/alice:/bin/sh\n")
        os.unlink(mnt / "data/blob")
        result = commit(store, changes, "lfscommit/new", message="add alice")
    catalog = Catalog(store.backend)
    image = catalog.get_image("lfscommit/new")
    assert image.id == result.image.id == image_id(image.config)
    assert [layer.diff_id for layer in image.layers] == image.config["rootfs"]["diff_ids"]
    assert image.layers[:-1] == base.layers
    assert image.config["history"][-1]["comment"] == "add alice"
    entries, meta = get_tree(store, result.layer.tree)
    assert [(e.kind.value, e.path) for e in entries] == [
        ("d", "data"),
        ("w", "data/blob"),
        ("d", "etc"),
        ("f", "etc/passwd"),
    ]
    assert write_layer(entries, store).diff_id == result.layer.diff_id == meta["diff_id"]
    assert catalog.get_layer(result.layer.diff_id) == result.layer
    diff_ids = image.config["rootfs"]["diff_ids"]
    assert result.chain_id == chain_ids(diff_ids)[-1] != diff_ids[-1]


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from layerfs.store.local import LocalBackend
    from layerfs.store.location import open_store
    from layerfs.catalog import Catalog
    from layerfs.commit import MountChanges, commit

    store_dir, mnt, upper, kill_at = sys.argv[1:]
    real_put_doc = LocalBackend.put_doc
    real_flush = LocalBackend.flush

    def put_doc(self, name, data):
        if name.startswith(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_put_doc(self, name, data)

    def flush(self):
        if kill_at == "flush" and self._pending:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_flush(self)

    LocalBackend.put_doc = put_doc
    LocalBackend.flush = flush
    store = open_store(store_dir)
    base = Catalog(store.backend).get_image("lfscommit/base:1")
    commit(store, MountChanges(Path(mnt), Path(upper), base), "lfscommit/killed")
    """
)


@needs_root
@pytest.mark.parametrize("kill_at", ["flush", "layers/", "images/"])
def test_sigkill_leaves_no_half_committed_image(tmp_path: Path, kill_at: str) -> None:
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    image_from_dir(store, _root(tmp_path), "lfscommit/base:1")
    with overlay_mount(tmp_path / "root", tmp_path / "ov") as (mnt, upper):
        (mnt / "data/new").write_bytes(os.urandom(500_000))
        proc = subprocess.run(
            [sys.executable, "-c", _KILLER, str(store_dir), str(mnt), str(upper), kill_at],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    catalog = Catalog(open_store(str(store_dir)).backend)
    assert [i.name for i in catalog.images()] == ["lfscommit/base:1"]
    for name in catalog.backend.list_docs("layers/"):
        layer = catalog.get_layer(
            name.removeprefix("layers/").removesuffix(".json").replace("-", ":", 1)
        )
        assert layer is not None
        get_tree(open_store(str(store_dir)), layer.tree)  # every listed layer is complete

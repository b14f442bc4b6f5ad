"""Directory trees (records format 2): one node per directory, reused by ID across backups.

A backup after a change to one file writes only the nodes from that file's
directory up to the root; every other directory's node is the parent backup's.
Reading checks every node: a crafted node cannot name a child of a file, give
an entry a name with '/', or nest without end.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from layerfs.exporter import export_image
from layerfs.importer import import_archive
from layerfs.maintenance import backup_roots
from layerfs.maintenance.liveset import DigestSets
from layerfs.maintenance.mark import mark_roots
from layerfs.records import (
    BadTree,
    DirTreeWriter,
    Entry,
    Kind,
    find_entry,
    get_tree,
    iter_below,
    iter_tree,
    keeps_order_as_dir_tree,
    node_entries,
    put_dir_tree,
    read_tree,
)
from layerfs.store.location import open_store
from tests.support.blobs import lose_blob
from tests.support.repos import saved_archive
from volplugin.backup import service
from volplugin.backup.diff import diff_entries, diff_trees
from volplugin.backup.snapshot import Scanner


def _docs(*entries: tuple[str, str]) -> list[dict]:
    return [Entry(path=p, kind=Kind(k), mode=0o755).to_json() for p, k in entries]


def test_round_trip_keeps_order_extras_and_meta(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    docs = _docs(("", "d"), ("a", "d"), ("a/x", "f"), ("a/y", "d"), ("a/y/z", "f"), ("b", "f"))
    extras = [[i, i * 10] for i in range(len(docs))]
    tree = put_dir_tree(store, docs, {"type": "backup"}, extras=extras)
    read = read_tree(store, tree)
    assert read.docs == docs  # the walk order: each directory's entries right after it
    assert read.extras == extras
    assert read.meta == {"type": "backup"}
    assert len(read.records) == 1 + 3  # the root record and the nodes of '', 'a', 'a/y'
    entries, meta = get_tree(store, tree)
    assert [e.path for e in entries] == ["", "a", "a/x", "a/y", "a/y/z", "b"]


def test_entries_below_a_file_are_refused_when_written(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="not a directory"):
        put_dir_tree(store, _docs(("", "d"), ("f", "f"), ("f/x", "f")))
    with pytest.raises(ValueError, match="not a directory"):
        put_dir_tree(store, _docs(("", "d"), ("missing/x", "f")))


def _node(store, items: list[dict]) -> str:
    return store.put_record(json.dumps({"format": 2, "node": items}).encode())


def _root(store, node: str) -> str:
    return store.put_record(json.dumps({"format": 2, "meta": {}, "root": node}).encode())


@pytest.mark.parametrize(
    ("items", "why"),
    [
        ([{"p": "a/b", "k": "f"}], "single name"),
        ([{"p": "", "k": "f"}], "single name"),
        ([{"p": "..", "k": "d"}], "climbs out"),
        ([{"p": ".", "k": "d"}], "not normalised"),
        ([{"p": "a\0b", "k": "f"}], "NUL"),
        ([{"p": "é" * 128, "k": "f"}], "longer than 255 bytes"),
        ([{"p": 7, "k": "f"}], "single name"),
        ([{"p": "h", "k": "h", "l": "../etc/shadow"}], "climbs out"),
        ([{"p": "f", "k": "f", "n": "0" * 64}], "not a directory"),
        ([{"p": "x", "k": "q"}], "unknown kind"),
    ],
)
def test_crafted_nodes_are_refused(tmp_path: Path, items: list[dict], why: str) -> None:
    """Every reader refuses them: the whole tree, the walk, one node, the walk below one."""
    store = open_store(str(tmp_path / "s"))
    node = _node(store, items)
    tree = _root(store, node)
    with pytest.raises(BadTree, match=why):
        read_tree(store, tree)
    with pytest.raises(BadTree, match=why):
        list(iter_tree(store, tree))
    with pytest.raises(BadTree, match=why):
        node_entries(store, node, "")
    with pytest.raises(BadTree, match=why):
        list(iter_below(store, node, "d"))


@pytest.mark.parametrize("folder", ["..", "a/../..", "/etc", "a//b", "a\0"])
def test_a_walk_below_a_folder_that_is_not_a_stored_path_is_refused(
    tmp_path: Path, folder: str
) -> None:
    """The paths of a walk below a folder start with it: it is checked as entries are."""
    store = open_store(str(tmp_path / "s"))
    node = _node(store, [{"p": "x", "k": "f"}])
    with pytest.raises(BadTree, match=re.escape(f"cannot read below {folder!r}")):
        list(iter_below(store, node, folder))
    with pytest.raises(BadTree, match=re.escape(f"cannot read below {folder!r}")):
        node_entries(store, node, folder)


def test_endless_nesting_is_refused(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    node = _node(store, [{"p": "d", "k": "d"}])
    for _ in range(2100):  # each level names the one below: deeper than any path can be
        node = _node(store, [{"p": "d", "k": "d", "n": node}])
    with pytest.raises(BadTree):
        read_tree(store, _root(store, node))


def test_a_missing_node_is_named(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    tree = put_dir_tree(store, _docs(("", "d"), ("a", "d"), ("a/x", "f")))
    read = read_tree(store, tree)
    store.flush()
    victim = read.records[-1]
    lose_blob(store.backend, victim)
    fresh = open_store(str(tmp_path / "s"))
    with pytest.raises(Exception, match=victim):
        read_tree(fresh, tree)


def test_an_incremental_backup_writes_only_the_changed_directories(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    for d in range(30):
        for f in range(20):
            path = vol / f"d{d:02}" / f"f{f:02}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"file {d} {f}\n" * 10)
    store = open_store(str(tmp_path / "s"))
    first = service.create_backup(store, "v", vol)
    (vol / "d07" / "f03.txt").write_text("changed\n")
    os.utime(vol / "d07", None)
    second = service.create_backup(store, "v", vol)
    one, two = read_tree(store, first.tree), read_tree(store, second.tree)
    assert len(two.records) == 1 + 1 + 30  # root record, root node, one node per directory
    # new: the root record, the root node and d07's node; the 29 other nodes are reused
    assert len(set(two.records) - set(one.records)) == 3
    assert second.files_read == 1
    out = tmp_path / "out"
    service.restore_backup(store, second.id, out)
    assert (out / "d07" / "f03.txt").read_text() == "changed\n"
    assert (out / "d29" / "f19.txt").read_text() == "file 29 19\n" * 10


def test_marking_reads_each_distinct_directory_once(tmp_path: Path) -> None:
    """gc and fsck mark a node shared by many backups once, and still keep all of it."""
    vol = tmp_path / "vol"
    for d in range(10):
        (vol / f"d{d}").mkdir(parents=True)
        (vol / f"d{d}" / "f").write_bytes(os.urandom(3000))
    store = open_store(str(tmp_path / "s"))
    backups = []
    for i in range(4):
        (vol / "top").write_text(f"change {i}\n")
        backups.append(service.create_backup(store, "v", vol))
    distinct = set().union(*(read_tree(store, b.tree).records for b in backups))
    assert len(distinct) == 4 * 2 + 10  # a head and root node each; the ten nodes shared
    reads: list[str] = []
    real_get = store.get_record
    store.get_record = lambda digest: reads.append(digest) or real_get(digest)  # type: ignore
    with DigestSets(tmp_path / "work") as sets:
        assert mark_roots(store, backup_roots(store.backend), sets) == []
        assert sorted(reads) == sorted(distinct)
        for b in backups:
            for entry in iter_tree(store, b.tree):
                assert all(sets.is_live(ref.digest) for ref in entry.chunks)


def test_diff_walks_nodes_and_agrees_with_the_whole_tree_diff(tmp_path: Path) -> None:
    """diff_trees (node by node) gives what comparing the whole entry lists gives,
    including a hard link in an unchanged directory whose target changed."""
    vol = tmp_path / "vol"
    for d in ("a/x", "a/y", "b", "c/deep/er", "gone/sub"):
        (vol / d).mkdir(parents=True)
        (vol / d / "f").write_text(f"in {d}\n")
    (vol / "b" / "target").write_text("before\n")
    os.link(vol / "b" / "target", vol / "c" / "deep" / "er" / "link")
    os.symlink("../b", vol / "a" / "sym")
    store = open_store(str(tmp_path / "s"))
    first = service.create_backup(store, "v", vol)
    (vol / "b" / "target").write_text("after, longer\n")  # same inode: the link too
    (vol / "a" / "x" / "f").write_text("changed\n")
    os.chmod(vol / "a" / "y", 0o700)
    for f in (vol / "gone").rglob("*"):
        if f.is_file():
            f.unlink()
    (vol / "gone" / "sub").rmdir()
    (vol / "gone").rmdir()
    (vol / "gone").write_text("now a file\n")
    (vol / "new" / "dir").mkdir(parents=True)
    (vol / "new" / "dir" / "g").write_text("new\n")
    second = service.create_backup(store, "v", vol)
    walked = diff_trees(store, first.tree, second.tree)
    whole = diff_entries(get_tree(store, first.tree)[0], get_tree(store, second.tree)[0])
    assert walked == whole
    by_path = {c.path: c for c in walked}
    assert "content" in by_path["c/deep/er/link"].what
    assert by_path["gone/sub/f"].change == "-" and by_path["new/dir/g"].change == "+"
    assert by_path["gone"].what == ("type",)
    assert "c/deep/er/f" not in by_path and "a/sym" not in by_path
    assert diff_trees(store, second.tree, second.tree) == []


# -- image layers ------------------------------------------------------------------------------


def test_which_orders_a_directory_tree_keeps() -> None:
    assert keeps_order_as_dir_tree(
        _docs(("", "d"), ("a", "d"), ("a/x", "f"), ("a/y", "d"), ("a/y/z", "f"), ("b", "f"))
    )
    assert keeps_order_as_dir_tree(_docs(("a", "d"), ("a/x", "f"), ("b", "w")))
    # an opaque mark lives in the node of the directory it marks, wherever the tar put it
    assert keeps_order_as_dir_tree(_docs(("", "o"), ("a", "d"), ("a", "o"), ("a/x", "f")))
    assert keeps_order_as_dir_tree(_docs(("a", "d"), ("a/x", "d"), ("a/x/y", "f"), ("a", "o")))
    for refused in (
        _docs(("a", "d"), ("b", "d"), ("a/x", "f")),  # back into a directory already left
        _docs(
            ("a/x", "f"),
        ),  # no entry for the parent
        _docs(("a", "f"), ("a/x", "f")),  # a parent that is not a directory
        _docs(("a", "d"), ("b", "d"), ("a", "o")),  # an opaque mark after its directory left
        _docs(("a", "d"), ("a", "o"), ("a", "o")),  # marked opaque twice
        _docs(("a", "d"), ("", "d")),  # the root after other entries
    ):
        assert not keeps_order_as_dir_tree(refused), refused


def _layer_archive(dest: Path, tag: str, names: list[str]) -> Path:
    """A one-layer `docker save` archive whose layer tar lists ``names`` in that order
    (a trailing '/' makes a directory)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 1_700_000_000
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = name.encode() * 100
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return saved_archive(dest, tag, layer.getvalue())


def _root_format(store, tree: str) -> int:
    return json.loads(store.get_record(tree))["format"]


@pytest.mark.parametrize(
    ("names", "fmt"),
    [
        (
            [
                "usr/",
                "usr/bin/",
                "usr/bin/a",
                "usr/bin/b",
                "usr/lib/",
                "usr/lib/c",
                "etc/",
                "etc/d",
            ],
            2,
        ),
        (["usr/", "etc/", "usr/a", "etc/b"], 1),  # directories interleaved: kept flat
    ],
)
def test_a_layer_is_a_directory_tree_when_its_tar_order_allows(
    tmp_path: Path, names: list[str], fmt: int
) -> None:
    store = open_store(str(tmp_path / "s"))
    archive = _layer_archive(tmp_path / "a.tar", "dt/layer:1", names)
    image = import_archive(store, archive)
    (layer,) = image.layers
    assert _root_format(store, layer.tree) == fmt
    entries, _ = get_tree(store, layer.tree)
    assert [e.path for e in entries] == [n.rstrip("/") for n in names]
    # layerfs writes tars its own way (headers), so the first export may change the DiffID;
    # its archive, imported and exported again, must come back byte for byte
    export_image(store, image, tmp_path / "out.tar")
    again = open_store(str(tmp_path / "s2"))
    reimported = import_archive(again, tmp_path / "out.tar")
    assert _root_format(again, reimported.layers[0].tree) == fmt
    assert export_image(again, reimported, tmp_path / "out2.tar").rewritten == []


def test_a_layer_with_opaque_directories_is_a_directory_tree_and_exports_exactly(
    tmp_path: Path,
) -> None:
    store = open_store(str(tmp_path / "s"))
    names = [
        "usr/",
        "usr/.wh..wh..opq",
        "usr/bin/",
        "usr/bin/a",
        "etc/",
        "etc/b",
        "etc/.wh..wh..opq",
    ]
    image = import_archive(store, _layer_archive(tmp_path / "a.tar", "dt/opaque:1", names))
    (layer,) = image.layers
    assert _root_format(store, layer.tree) == 2
    entries, _ = get_tree(store, layer.tree)
    assert [(e.path, e.kind.value) for e in entries] == [
        ("usr", "d"),
        ("usr", "o"),
        ("usr/bin", "d"),
        ("usr/bin/a", "f"),
        ("etc", "d"),
        ("etc/b", "f"),
        ("etc", "o"),
    ]
    # the marks are items of their directories' nodes: no path repeats in a node
    usr = find_entry(store, layer.tree, "usr")
    assert usr is not None and usr.kind is Kind.DIR
    export_image(store, image, tmp_path / "out.tar")
    again = open_store(str(tmp_path / "s2"))
    reimported = import_archive(again, tmp_path / "out.tar")
    assert _root_format(again, reimported.layers[0].tree) == 2
    assert export_image(again, reimported, tmp_path / "out2.tar").rewritten == []


def test_a_tampered_opaque_mark_in_a_node_is_refused(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    for bad in ({"p": "", "k": "f", "m": 420}, {"p": "", "k": "d", "m": 493}):
        node = store.put_record(json.dumps({"format": 2, "node": [bad]}).encode())
        root = store.put_record(
            json.dumps({"format": 2, "meta": {}, "root": node, "self": None}).encode()
        )
        with pytest.raises(BadTree, match="no single name"):
            list(iter_tree(store, root))


def test_equal_directories_of_two_layers_are_one_node(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    shared = ["usr/", "usr/share/", "usr/share/a", "usr/share/b"]
    one = import_archive(store, _layer_archive(tmp_path / "1.tar", "dt/one:1", shared + ["x"]))
    two = import_archive(store, _layer_archive(tmp_path / "2.tar", "dt/two:1", shared + ["y"]))
    first = read_tree(store, one.layers[0].tree).records
    second = read_tree(store, two.layers[0].tree).records
    assert len(set(first) & set(second)) == 2  # the nodes of usr/ and usr/share/


def test_a_backup_holds_only_the_directories_on_its_walk_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries go to the tree writer as the walk meets them; a node leaves memory when written."""
    vol = tmp_path / "vol"
    for d in range(30):
        (vol / f"d{d:02}").mkdir(parents=True)
        for f in range(30):
            (vol / f"d{d:02}" / f"f{f:02}").write_text(f"{d}/{f}\n")
    held: list[int] = []
    original = DirTreeWriter.add

    def add(self, doc, extra=None):  # noqa: ANN001, ANN202
        original(self, doc, extra)
        held.append(sum(len(items) for _, items, _ in self._open))

    monkeypatch.setattr(DirTreeWriter, "add", add)
    scans = []
    scan = Scanner.scan
    monkeypatch.setattr(Scanner, "scan", lambda self: scans.append(scan(self)) or scans[-1])
    store = open_store(str(tmp_path / "s"))
    first = service.create_backup(store, "walk", vol)
    (vol / "d07" / "f03").write_text("changed\n")
    second = service.create_backup(store, "walk", vol)
    assert len(held) == 2 * (1 + 30 + 30 * 30)
    assert [len(result.docs) for result in scans] == [0, 0]  # no list of every entry
    assert max(held) <= 30 + 30  # the root's 30 directories and one directory's 30 files
    entries, _ = get_tree(store, second.tree)
    assert len(entries) == 1 + 30 + 900 and second.files_read == 1
    changed = read_tree(store, second.tree).records
    assert len(set(changed) - set(read_tree(store, first.tree).records)) == 3  # root, '', d07

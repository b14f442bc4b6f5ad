"""Directory trees (records format 2): one node per directory, reused by ID across backups.

A backup after a change to one file writes only the nodes from that file's
directory up to the root; every other directory's node is the parent backup's.
Reading checks every node: a crafted node cannot name a child of a file, give
an entry a name with '/', or nest without end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from layerfs.records import BadTree, Entry, Kind, get_tree, put_dir_tree, read_tree
from layerfs.store.location import open_store
from tests.support.blobs import lose_blob
from volplugin.backup import service


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
        ([{"p": "f", "k": "f", "n": "0" * 64}], "not a directory"),
        ([{"p": "x", "k": "q"}], "unknown kind"),
    ],
)
def test_crafted_nodes_are_refused(tmp_path: Path, items: list[dict], why: str) -> None:
    store = open_store(str(tmp_path / "s"))
    tree = _root(store, _node(store, items))
    with pytest.raises(BadTree, match=why):
        read_tree(store, tree)


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

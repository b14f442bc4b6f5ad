"""Confined file access (layerfs.confined), the check of tree records read from the store,
and pins as roots of the live set."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from layerfs.confined import (
    Attributes,
    DirFds,
    Escape,
    apply_at,
    apply_fd,
    open_dir,
    open_root,
    read_xattrs,
    remove_at,
)
from layerfs.formats.paths import BadPath, check_stored
from layerfs.maintenance.gc import collect_garbage
from layerfs.maintenance.pins import list_pins, pinned
from layerfs.maintenance.roots import all_roots
from layerfs.records import BadTree, Entry, Kind, decode_tree, encode_tree_docs, get_tree
from layerfs.store import open_store


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree with a directory, a file, a fifo, a symlink and a symlink to a 'host' directory."""
    root = tmp_path / "vol"
    (root / "d").mkdir(parents=True)
    (root / "f").write_text("x")
    os.mkfifo(root / "fifo")
    os.symlink("nowhere", root / "sl")
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host file")
    os.symlink(str(host), root / "evil")
    return root


@pytest.mark.parametrize(
    "bad",
    ["/etc", "a/../..", "..", "a//b", "./a", "a/.", "a/", "a\0b", "x" * 256, "a/" + "y" * 256],
)
def test_check_stored_refuses(bad: str) -> None:
    with pytest.raises(BadPath):
        check_stored(bad)


@pytest.mark.parametrize("good", ["", "a", "a/b/c", ".hidden", "a..b", "é" * 127, "x" * 255])
def test_check_stored_accepts(good: str) -> None:
    assert check_stored(good) == good


def _record(*docs: dict) -> bytes:
    return encode_tree_docs(list(docs))


def test_tree_with_escaping_path_refused_naming_it() -> None:
    data = _record({"p": "", "k": "d"}, {"p": "../../etc/cron.d/x", "k": "f", "m": 0o644})
    with pytest.raises(BadTree, match=r"\.\./\.\./etc/cron\.d/x"):
        decode_tree(data)


def test_tree_with_entry_below_symlink_refused() -> None:
    data = _record(
        {"p": "a", "k": "l", "l": "/etc"},
        {"p": "a/cron.d", "k": "f", "m": 0o644},
    )
    with pytest.raises(BadTree, match="lies below 'a', which is not a directory"):
        decode_tree(data)


def test_tree_hardlink_target_checked() -> None:
    data = _record({"p": "h", "k": "h", "l": "/etc/shadow"})
    with pytest.raises(BadTree, match="absolute"):
        decode_tree(data)


@pytest.mark.parametrize(
    "data",
    [b"{", b"[]", b'{"format": 1, "entries": 5}', b"[" * 100000 + b"]" * 100000],
)
def test_malformed_tree_records_refused(data: bytes) -> None:
    with pytest.raises(BadTree):
        decode_tree(data)


def test_tree_of_unknown_kind_or_bad_field_refused() -> None:
    with pytest.raises(BadTree, match="unknown kind"):
        decode_tree(_record({"p": "a", "k": "z"}))
    with pytest.raises(BadTree, match="malformed"):
        decode_tree(_record({"p": "a", "k": "f", "c": [["abc"]]}))


def test_good_tree_still_decodes() -> None:
    entries = [
        Entry("", Kind.DIR),
        Entry("d", Kind.DIR),
        Entry("d/f", Kind.FILE, inline=b"hi", size=2),
        Entry("d/l", Kind.SYMLINK, target="../../../etc"),  # a target is content, not a path
        Entry("d/h", Kind.HARDLINK, target="d/f"),
        Entry("w", Kind.WHITEOUT),
    ]
    got, _ = decode_tree(encode_tree_docs([e.to_json() for e in entries]))
    assert [e.path for e in got] == [e.path for e in entries]


def test_get_tree_names_the_record(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    digest = store.put_record(_record({"p": "/abs", "k": "f"}))
    store.flush()
    with pytest.raises(BadTree, match=f"tree record {digest}.*'/abs'"):
        get_tree(store, digest)


def test_open_dir_refuses_symlinked_component(tree: Path) -> None:
    root = open_root(tree)
    try:
        with pytest.raises(Escape, match="evil"):
            open_dir(root, "evil")
        with pytest.raises(Escape):
            open_dir(root, "f")
        with pytest.raises(Escape):
            open_dir(root, "d/../evil")
        fd = open_dir(root, "d/x/y", create=0o700)
        os.close(fd)
        assert (tree / "d/x/y").is_dir()
    finally:
        os.close(root)


def test_dirfds_never_creates_through_a_symlink(tree: Path, tmp_path: Path) -> None:
    with DirFds.open(tree) as dirs:
        with pytest.raises(Escape, match="evil"):
            dirs.get("evil/new", create=0o700)
        assert sorted(os.listdir(tmp_path / "host")) == ["secret"]
        fd = dirs.get("d/a/b", create=0o700)
        assert dirs.get("d/a/b") == fd
        dirs.forget("d/a")
        assert dirs.get("d/a/b") != -1


def test_dirfds_limit_closes_least_recent(tree: Path) -> None:
    with DirFds(open_root(tree), limit=2) as dirs:
        for i in range(5):
            dirs.get(f"d/{i}", create=0o700)
        assert len(dirs._fds) == 2


def test_apply_attributes_on_every_kind_without_following(tree: Path, tmp_path: Path) -> None:
    root = open_root(tree)
    host = tmp_path / "host"
    before = os.stat(host)
    attrs = Attributes(uid=1234, gid=4321, mode=0o4750, mtime_ns=10**18, xattrs={"trusted.k": b"v"})
    try:
        for name in ("f", "fifo", "d"):
            apply_at(root, name, attrs, owner_required=True)
            st = os.lstat(tree / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 4321, 0o4750)
            assert st.st_mtime_ns == 10**18
            assert read_xattrs(None, root, name) == {"trusted.k": b"v"}
        link_attrs = Attributes(uid=7, gid=7, mode=0o777, mtime_ns=5 * 10**17)
        apply_at(root, "evil", link_attrs, owner_required=True)
        st = os.lstat(tree / "evil")
        assert (st.st_uid, st.st_mtime_ns) == (7, 5 * 10**17)
        after = os.stat(host)  # the symlink's target is untouched
        assert (after.st_uid, after.st_mode, after.st_mtime_ns) == (
            before.st_uid,
            before.st_mode,
            before.st_mtime_ns,
        )
        fd = os.open("f", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=root)
        apply_fd(fd, Attributes(0, 0, 0o600, 10**9), owner_required=True)
        os.close(fd)
        assert stat.S_IMODE(os.lstat(tree / "f").st_mode) == 0o600
    finally:
        os.close(root)


def test_remove_at_does_not_follow(tree: Path, tmp_path: Path) -> None:
    root = open_root(tree)
    try:
        remove_at(root, "evil")
        (tree / "d" / "sub").mkdir()
        os.symlink(str(tmp_path / "host"), tree / "d" / "sub" / "link")
        remove_at(root, "d")
        remove_at(root, "missing")
    finally:
        os.close(root)
    assert sorted(os.listdir(tree)) == ["f", "fifo", "sl"]
    assert (tmp_path / "host" / "secret").read_text() == "host file"


def test_pinned_tree_survives_gc(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    refs = store.write_bytes(os.urandom(200_000))
    entry = Entry("f", Kind.FILE, size=200_000, chunks=refs)
    tree = store.put_record(encode_tree_docs([entry.to_json()]))
    store.flush()
    with pinned(store.backend, tree, "restore of backup b1 into volume v", host="h1") as pin:
        assert [(p.tree, p.host) for p in list_pins(store.backend)] == [(tree, "h1")]
        collect_garbage(store, lambda: all_roots(store.backend), grace_seconds=0)
        assert store.get_record(tree)
        assert all(store.backend.has_blob(r.digest) for r in refs)
        doc = json.loads(store.backend.get_doc(pin.doc_name))
        assert doc["holder"] == "restore of backup b1 into volume v"
    assert list_pins(store.backend) == []
    collect_garbage(store, lambda: all_roots(store.backend), grace_seconds=0)
    assert not any(store.backend.has_blob(r.digest) for r in refs)

"""The merge rules of image layers, checked through the on-disk index and ImageView."""

from __future__ import annotations

import os

import pytest

from layerfs.errors import CorruptObject
from layerfs.index import ImageView, MergeError, ensure_index, index_path
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkStore
from layerfs.store.local import LocalBackend
from tests.support.blobs import corrupt_blob
from tests.support.synthetic import MTIME, d, f, link, make_image, opq, sym, wh


@pytest.fixture
def store(tmp_path) -> ChunkStore:
    return ChunkStore(LocalBackend(tmp_path / "store"))


def view_of(store: ChunkStore, layers: list[list[Entry]], name: str = "t:1") -> ImageView:
    image = make_image(store, name, layers)
    return ImageView(store, ensure_index(store, image))


def content(view: ImageView, path: str) -> bytes:
    node = view.lookup(path)
    assert node is not None and node.kind is Kind.FILE
    return view.read(node, 0, node.size + 10)


def test_whiteout_hides_lower_only_and_is_invisible(store):
    v = view_of(
        store,
        [
            [d("etc"), f(store, "etc/a", b"a"), f(store, "etc/b", b"b"), f(store, "etc/c", b"c")],
            # `etc/c` is whited out and re-added in the same layer: the new one stays.
            [f(store, "etc/c", b"new c"), wh("etc/a"), wh("etc/c"), wh("etc/missing")],
        ],
    )
    assert v.listdir("etc") == ["b", "c"]
    assert v.lookup("etc/a") is None
    assert v.lookup("etc/.wh.a") is None
    assert content(v, "etc/c") == b"new c"


def test_opaque_hides_every_lower_child_wherever_it_sits(store):
    v = view_of(
        store,
        [
            [d("d", mode=0o700), f(store, "d/old1", b"1"), d("d/sub"), f(store, "d/sub/x", b"x")],
            # The marker comes after a sibling of this layer, which must survive.
            [d("d", mode=0o751), f(store, "d/before", b"b"), opq("d"), f(store, "d/after", b"a")],
        ],
    )
    assert v.listdir("d") == ["after", "before"]
    assert v.lookup("d/sub/x") is None
    assert v.lookup("d/.wh..wh..opq") is None
    assert v.lookup("d").mode == 0o751


def test_whiteout_of_a_directory_removes_its_subtree(store):
    v = view_of(
        store,
        [
            [d("a"), d("a/b"), f(store, "a/b/c", b"c"), f(store, "keep", b"k")],
            [wh("a")],
        ],
    )
    assert v.listdir("") == ["keep"]
    assert v.lookup("a/b/c") is None


def test_dir_replaced_by_file_and_file_by_dir(store):
    v = view_of(
        store,
        [
            [d("x"), f(store, "x/inner", b"i"), f(store, "y", b"was a file")],
            [f(store, "x", b"now a file"), d("y", mode=0o711)],
        ],
    )
    assert content(v, "x") == b"now a file"
    assert v.lookup("x/inner") is None
    y = v.lookup("y")
    assert y.kind is Kind.DIR and y.mode == 0o711
    assert v.listdir("y") == []


def test_dir_over_dir_merges_and_takes_upper_attributes(store):
    v = view_of(
        store,
        [
            [d("m", mode=0o755, uid=1, gid=2, xattrs={"user.low": b"1"}), f(store, "m/low", b"l")],
            [
                d("m", mode=0o1777, uid=7, gid=8, mtime_ns=5, xattrs={"user.up": b"2"}),
                f(store, "m/up", b"u"),
            ],
        ],
    )
    m = v.lookup("m")
    assert (m.mode, m.uid, m.gid, m.mtime_ns) == (0o1777, 7, 8, 5)
    assert v.xattrs(m) == {"user.up": b"2"}
    assert v.listdir("m") == ["low", "up"]


def test_file_over_file_replaces_everything(store):
    v = view_of(
        store,
        [
            [f(store, "f", b"old", mode=0o600, xattrs={"user.a": b"1"})],
            [f(store, "f", b"newer", mode=0o640, uid=3)],
        ],
    )
    node = v.lookup("f")
    assert (node.mode, node.uid, node.size) == (0o640, 3, 5)
    assert v.xattrs(node) == {}
    assert content(v, "f") == b"newer"


def test_hardlinks_share_one_inode_and_count_links(store):
    v = view_of(store, [[d("h"), f(store, "h/a", b"data" * 40), link("h/b", "h/a")]])
    a, b = v.lookup("h/a"), v.lookup("h/b")
    assert a.ino == b.ino
    assert a.nlink == b.nlink == 2
    assert a.kind is Kind.FILE and b.kind is Kind.FILE
    assert content(v, "h/b") == b"data" * 40


def test_hardlink_into_a_lower_layer(store):
    v = view_of(
        store,
        [
            [d("lib"), f(store, "lib/real", b"R" * 100, mode=0o4755, uid=5)],
            [d("bin"), link("bin/alias", "lib/real")],
        ],
    )
    real, alias = v.lookup("lib/real"), v.lookup("bin/alias")
    assert real.ino == alias.ino and alias.nlink == 2
    assert (alias.mode, alias.uid) == (0o4755, 5)
    assert content(v, "bin/alias") == b"R" * 100


def test_link_removed_in_upper_layer_is_not_counted(store):
    v = view_of(
        store,
        [
            [f(store, "a", b"x"), link("b", "a"), link("c", "a")],
            [wh("b")],
        ],
    )
    assert v.lookup("b") is None
    assert v.lookup("a").nlink == v.lookup("c").nlink == 2
    assert v.lookup("a").ino == v.lookup("c").ino


def test_replacing_one_link_leaves_the_other_alone(store):
    v = view_of(
        store,
        [
            [f(store, "a", b"shared"), link("b", "a")],
            [f(store, "a", b"fresh")],
        ],
    )
    a, b = v.lookup("a"), v.lookup("b")
    assert a.ino != b.ino
    assert a.nlink == b.nlink == 1
    assert content(v, "b") == b"shared" and content(v, "a") == b"fresh"


def test_hardlink_may_name_a_path_this_layer_whites_out(store):
    v = view_of(store, [[f(store, "old", b"o")], [wh("old"), link("new", "old")]])
    assert v.lookup("old") is None
    assert content(v, "new") == b"o" and v.lookup("new").nlink == 1


def test_hardlink_to_nothing_is_refused(store):
    with pytest.raises(MergeError, match="does not exist"):
        view_of(store, [[link("b", "nowhere")]])


def test_special_files_modes_owners_times_xattrs(store):
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    long_name = "n" * 255
    odd_name = b"caf\xe9".decode("utf-8", "surrogateescape")
    v = view_of(
        store,
        [
            [
                d("dev"),
                Entry("dev/null", Kind.CHAR, mode=0o666, rdev=(1, 3), mtime_ns=MTIME),
                Entry("dev/sda", Kind.BLOCK, mode=0o660, gid=6, rdev=(8, 0), mtime_ns=MTIME),
                Entry("fifo", Kind.FIFO, mode=0o644, mtime_ns=MTIME),
                Entry("sock", Kind.SOCKET, mode=0o755, mtime_ns=MTIME),
                sym("link", "dev/null"),
                Entry("odd-mode-link", Kind.SYMLINK, mode=0o644, target="x", mtime_ns=MTIME),
                f(store, "suid", b"s", mode=0o4755),
                f(store, "sgid", b"s", mode=0o2711, uid=1000, gid=1001),
                d("tmp", mode=0o1777),
                f(store, "ping", b"p", mode=0o755, xattrs={"security.capability": cap}),
                f(store, long_name, b"long"),
                f(store, odd_name, b"latin1 name"),
            ]
        ],
    )
    null = v.lookup("dev/null")
    assert (null.kind, null.rdev, null.mode) == (Kind.CHAR, (1, 3), 0o666)
    sda = v.lookup("dev/sda")
    assert (sda.kind, sda.rdev, sda.gid) == (Kind.BLOCK, (8, 0), 6)
    assert v.lookup("fifo").kind is Kind.FIFO
    assert v.lookup("sock").kind is Kind.SOCKET
    lnk = v.lookup("link")
    assert (lnk.kind, lnk.target, lnk.size) == (Kind.SYMLINK, "dev/null", 8)
    assert v.lookup("odd-mode-link").mode == 0o777  # as Linux shows every symlink
    assert v.lookup("suid").st_mode & 0o7777 == 0o4755
    sgid = v.lookup("sgid")
    assert (sgid.mode, sgid.uid, sgid.gid) == (0o2711, 1000, 1001)
    assert v.lookup("tmp").mode == 0o1777
    assert v.lookup("suid").mtime_ns == MTIME
    assert v.xattrs(v.lookup("ping")) == {"security.capability": cap}
    assert content(v, long_name) == b"long"
    assert content(v, odd_name) == b"latin1 name"
    assert odd_name in v.listdir("")


def test_missing_parents_are_created_and_dir_nlink_counts_subdirs(store):
    v = view_of(store, [[f(store, "a/b/c", b"c"), d("a/e")]])
    a = v.lookup("a")
    assert a.kind is Kind.DIR and a.mode == 0o755 and a.uid == 0
    assert a.nlink == 4  # '.', the entry in the root, and b/.. and e/..
    assert v.lookup("").nlink == 3


def test_inode_numbers_are_stable_and_root_is_one(store, tmp_path):
    layers = [[d("a"), f(store, "a/x", b"x"), link("y", "a/x"), d("b"), sym("b/s", "../a")]]
    first = view_of(store, layers, "one:1")
    other = ChunkStore(LocalBackend(tmp_path / "other"))
    layers2 = [[d("a"), f(other, "a/x", b"x"), link("y", "a/x"), d("b"), sym("b/s", "../a")]]
    second = view_of(other, layers2, "two:1")
    assert first.lookup("").ino == 1
    for path in ("a", "a/x", "y", "b", "b/s"):
        assert first.lookup(path).ino == second.lookup(path).ino
    again = ImageView(store, first.index)
    assert again.lookup("b/s").ino == first.lookup("b/s").ino


def test_statfs_counts_inodes_and_blocks(store):
    v = view_of(
        store,
        [[d("d"), f(store, "d/one", b"1" * 5000), link("two", "d/one"), f(store, "e", b"")]],
    )
    st = v.statfs()
    assert st.files == 4  # root, d, one (= two), e
    assert st.blocks == 2  # 5000 bytes in 4 KiB blocks, counted once
    assert st.namemax == 255


def test_read_at_any_offset_of_a_multi_chunk_file(store):
    data = os.urandom(700_000)
    v = view_of(store, [[f(store, "big", data)]])
    node = v.lookup("big")
    assert node.size == len(data)
    for offset, size in [(0, 1), (1, 4096), (65_535, 200_000), (699_990, 100), (123_457, 1)]:
        assert v.read(node, offset, size) == data[offset : offset + size]
    assert v.read(node, len(data), 10) == b""


def test_a_corrupt_chunk_raises_instead_of_returning_bytes(store):
    data = os.urandom(300_000)
    entry = f(store, "big", data)
    v = view_of(store, [[entry]])
    victim = entry.chunks[1]
    corrupt_blob(store.backend, victim.digest, at=-1)
    node = v.lookup("big")
    assert v.read(node, 0, entry.chunks[0].size) == data[: entry.chunks[0].size]
    with pytest.raises(CorruptObject, match=victim.digest):
        v.read(node, entry.chunks[0].size, 10)


def test_index_is_built_once_without_leftovers(store):
    image = make_image(store, "once:1", [[f(store, "a", b"a")]])
    path = ensure_index(store, image)
    assert path == index_path(store, image)
    stamp = path.stat().st_mtime_ns
    assert ensure_index(store, image) == path
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _rows(path) -> dict[str, list]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return {
            t: sorted(db.execute(f"SELECT * FROM {t}").fetchall())  # noqa: S608 - fixed names
            for t in ("inodes", "dirents", "xattrs", "meta")
        }
    finally:
        db.close()


def test_a_one_layer_index_written_node_by_node_equals_the_merged_one(store, tmp_path):
    """A backup's directory tree is indexed while it is read, one node at a time; the
    result is row for row what merging the whole tree in memory gives (inode numbers,
    link counts, names in byte order, xattrs, totals)."""
    from layerfs.catalog import ImageRecord, LayerRecord
    from layerfs.index.build import build_index
    from layerfs.records import dir_tree_root, put_tree
    from volplugin.backup import service

    vol = tmp_path / "vol"
    (vol / "sub" / "deep").mkdir(parents=True)
    (vol / "empty").mkdir()
    (vol / "sub" / "file").write_bytes(os.urandom(10_000))
    os.link(vol / "sub" / "file", vol / "zlink")  # a link the numbering meets first
    os.link(vol / "sub" / "file", vol / "sub" / "deep" / "again")
    os.symlink("sub/file", vol / "sym")
    os.mkfifo(vol / "fifo")
    os.setxattr(vol / "sub" / "deep", "user.note", b"kept")
    for name in (b"\x80x", "éx".encode(), b"Z", b"a"):  # str and byte order differ
        (vol / os.fsdecode(name)).write_bytes(name * 300)
    os.chmod(vol / "sub", 0o750)
    backup = service.create_backup(store, "v", vol)
    assert dir_tree_root(store, backup.tree) is not None
    layer = LayerRecord(diff_id="sha256:" + "1" * 64, tree=backup.tree)
    one = ImageRecord(name="one", id="sha256:" + "2" * 64, config={}, layers=[layer])
    empty = LayerRecord(diff_id="sha256:" + "3" * 64, tree=put_tree(store, []))
    two = ImageRecord(name="two", id=one.id, config={}, layers=[layer, empty])
    build_index(store, one, tmp_path / "streamed.sqlite")
    build_index(store, two, tmp_path / "merged.sqlite")  # two layers: merged in memory
    streamed, merged = _rows(tmp_path / "streamed.sqlite"), _rows(tmp_path / "merged.sqlite")
    assert streamed == merged
    view = ImageView(store, tmp_path / "streamed.sqlite")
    assert view.lookup("zlink").ino == view.lookup("sub/deep/again").ino
    assert view.lookup("sub/file").nlink == 3
    assert content(view, "sub/file") == (vol / "sub" / "file").read_bytes()

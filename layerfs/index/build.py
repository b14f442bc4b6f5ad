"""Build the on-disk index of an image's merged tree (SQLite), once per distinct layer stack.

The index lives under ``backend.cache_dir()/index/`` and is named by a hash of
the index format and the layers' tree records, so images sharing all their
layers share one index. It is written to a temp file and renamed into place,
so a reader never sees a partial index and concurrent builders are harmless.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from layerfs.catalog import ImageRecord
from layerfs.records import (
    BadTree,
    Entry,
    Kind,
    dir_tree_root,
    find_entry,
    get_tree,
    iter_tree,
    node_entries,
)
from layerfs.store.chunks import ChunkRef, ChunkStore

if TYPE_CHECKING:
    from layerfs.index.merge import MergedTree

INDEX_FORMAT = 2
ROOT_INO = 1  # the root directory's inode number in every index
BLOCK_SIZE = 4096

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inodes(
    ino INTEGER PRIMARY KEY, kind TEXT NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, nlink INTEGER NOT NULL,
    rdev_major INTEGER NOT NULL, rdev_minor INTEGER NOT NULL,
    target BLOB, inline BLOB, chunks BLOB);
CREATE TABLE dirents(
    parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY(parent, name)) WITHOUT ROWID;
CREATE TABLE xattrs(
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
"""


def fs_bytes(text: str) -> bytes:
    """A name or path as the bytes the kernel sees (surrogate escapes restored)."""
    return text.encode("utf-8", "surrogateescape")


def fs_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def pack_chunks(chunks: list[ChunkRef]) -> bytes:
    """Chunk list as bytes: per chunk, digest length, raw digest, plain size."""
    out = bytearray()
    for ref in chunks:
        raw = bytes.fromhex(ref.digest)
        out += struct.pack("<B", len(raw)) + raw + struct.pack("<Q", ref.size)
    return bytes(out)


def unpack_chunks(data: bytes) -> list[ChunkRef]:
    out = []
    pos = 0
    while pos < len(data):
        n = data[pos]
        digest = data[pos + 1 : pos + 1 + n].hex()
        (size,) = struct.unpack_from("<Q", data, pos + 1 + n)
        out.append(ChunkRef(digest, size))
        pos += 1 + n + 8
    return out


def index_key(image: ImageRecord) -> str:
    """Name of an image's index: the format and its layers' tree records."""
    text = "\n".join([f"layerfs-index-{INDEX_FORMAT}", *(layer.tree for layer in image.layers)])
    return hashlib.sha256(text.encode()).hexdigest()


def index_path(store: ChunkStore, image: ImageRecord) -> Path:
    return store.backend.cache_dir() / "index" / f"{index_key(image)}.sqlite"


def ensure_index(store: ChunkStore, image: ImageRecord) -> Path:
    """Path of the image's index, building it first if it is not there yet."""
    path = index_path(store, image)
    if not path.exists():
        build_index(store, image, path)
    return path


def _inode_row(ino: int, e: Entry, nlink: int) -> tuple:
    content_kind = e.kind is Kind.FILE
    if content_kind:
        size = e.size
    elif e.kind is Kind.SYMLINK:
        size = len(fs_bytes(e.target))
    else:
        size = 0
    # Linux has no symlink permissions: every symlink shows 0777, whatever its tar header says.
    mode = 0o777 if e.kind is Kind.SYMLINK else e.mode & 0o7777
    return (
        ino,
        e.kind.value,
        mode,
        e.uid,
        e.gid,
        size,
        e.mtime_ns,
        nlink,
        e.rdev[0],
        e.rdev[1],
        fs_bytes(e.target) if e.kind is Kind.SYMLINK else None,
        e.inline if content_kind else None,
        pack_chunks(e.chunks) if content_kind and e.inline is None else None,
    )


def build_index(store: ChunkStore, image: ImageRecord, path: Path) -> None:
    """Merge the image's layers and write the index to ``path`` atomically.

    One layer stored as a directory tree (every backup a lazy volume serves,
    and one-layer images) is written as it is read, one directory node at a
    time (``_write_one_layer``); more layers are merged in memory first.
    """
    tree: MergedTree | None = None
    targets = _link_targets(store, image.layers[0].tree) if len(image.layers) == 1 else None
    if targets is None:
        from layerfs.index.merge import merge_layers

        tree = merge_layers(get_tree(store, layer.tree)[0] for layer in image.layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".sqlite")
    os.close(fd)
    try:
        db = sqlite3.connect(tmp)
        try:
            db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
            if tree is None:
                _write_one_layer(db, store, image, targets)
            else:
                _write_tree(db, tree, image)
            db.commit()
        finally:
            db.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_tree(db: sqlite3.Connection, tree: MergedTree, image: ImageRecord) -> None:
    from layerfs.index.merge import Dir, Inode

    seen: set[int] = set()
    inodes: list[tuple] = []
    dirents: list[tuple] = []
    xattrs: list[tuple] = []
    blocks = 0
    parents: dict[str, int] = {}
    for path, node in tree.walk():
        if isinstance(node, Dir):
            parents[path] = node.ino
        if path:
            parent = parents[path.rsplit("/", 1)[0] if "/" in path else ""]
            dirents.append((parent, fs_bytes(path.rsplit("/", 1)[-1]), node.ino))
        if node.ino in seen:
            continue
        seen.add(node.ino)
        e = node.entry
        inodes.append(_inode_row(node.ino, e, node.nlink))
        xattrs.extend((node.ino, fs_bytes(k), v) for k, v in e.xattrs.items())
        if isinstance(node, Inode) and e.kind is Kind.FILE:
            blocks += -(-e.size // BLOCK_SIZE)
        if len(inodes) >= 10000:
            _flush(db, inodes, dirents, xattrs)
    _flush(db, inodes, dirents, xattrs)
    _write_meta(db, image, blocks, len(seen))


def _write_meta(db: sqlite3.Connection, image: ImageRecord, blocks: int, files: int) -> None:
    meta = {
        "format": str(INDEX_FORMAT),
        "image": image.id,
        "blocks": str(blocks),
        "files": str(files),
        "bsize": str(BLOCK_SIZE),
    }
    db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())


def _link_targets(store: ChunkStore, tree: str) -> dict[str, int] | None:
    """For a layer stored as a directory tree: each hard link target and how many links
    name it. None for a flat tree, or when a link names another link (a chain the
    one-pass numbering does not follow)."""
    try:
        dir_tree_root(store, tree)
    except BadTree:
        return None
    targets: dict[str, int] = {}
    links: set[str] = set()
    for e in iter_tree(store, tree):
        if e.kind is Kind.HARDLINK:
            targets[e.target] = targets.get(e.target, 0) + 1
            links.add(e.path)
    return None if targets.keys() & links else targets


def _write_one_layer(
    db: sqlite3.Connection, store: ChunkStore, image: ImageRecord, targets: dict[str, int]
) -> None:
    """The index of a one-layer image, numbered as MergedTree.finish numbers (root 1,
    then depth first with names in byte order) and written while its directory tree
    is read one node at a time. What stays in memory: the hard links' ``targets``
    (with the number of links to each) and the directories still to visit."""
    from layerfs.index.merge import MergeError

    tree = image.layers[0].tree
    target_ino: dict[str, int] = {}
    written: set[str] = set()  # targets whose inode row is written
    rows: tuple[list, list, list] = ([], [], [])
    inodes, dirents, xattrs = rows
    next_ino = ROOT_INO
    blocks = 0

    def new_ino() -> int:
        nonlocal next_ino
        next_ino += 1
        return next_ino - 1

    def inode(ino: int, e: Entry, nlink: int) -> None:
        nonlocal blocks
        inodes.append(_inode_row(ino, e, nlink))
        xattrs.extend((ino, fs_bytes(k), v) for k, v in e.xattrs.items())
        if e.kind is Kind.FILE:
            blocks += -(-e.size // BLOCK_SIZE)
        if len(inodes) >= 10000:
            _flush(db, *rows)

    root = find_entry(store, tree, "")
    if root is None:
        root = Entry("", Kind.DIR, mode=0o755)  # as MergedTree's implicit root
    stack: list[tuple[Entry, str | None, int]] = [(root, dir_tree_root(store, tree), 0)]
    while stack:
        entry, node, parent = stack.pop()
        ino = new_ino()  # directories are numbered as they are visited
        if entry.path:
            dirents.append((parent, fs_bytes(entry.name), ino))
        children = node_entries(store, node, entry.path) if node is not None else []
        children.sort(key=lambda ec: fs_bytes(ec[0].name))
        subdirs = [ec for ec in children if ec[0].kind is Kind.DIR]
        inode(ino, entry, 2 + len(subdirs))
        for child, _node in children:
            if child.kind in (Kind.WHITEOUT, Kind.OPAQUE):
                continue  # they act on lower layers, and there are none
            if child.kind is Kind.DIR:
                continue  # numbered when visited
            linked = child.target if child.kind is Kind.HARDLINK else child.path
            if linked not in targets:
                child_ino = new_ino()
                inode(child_ino, child, 1)
            else:  # one inode, numbered by whichever of its paths comes first
                if linked not in target_ino:
                    target_ino[linked] = new_ino()
                child_ino = target_ino[linked]
                if child.kind is not Kind.HARDLINK:
                    inode(child_ino, child, 1 + targets[linked])
                    written.add(linked)
            dirents.append((ino, fs_bytes(child.name), child_ino))
        stack.extend((child, child_node, ino) for child, child_node in reversed(subdirs))
    missing = targets.keys() - written
    if missing:
        raise MergeError(
            f"hardlink to {sorted(missing)[0]!r} names a path that does not exist or is a "
            "directory; the layer is damaged: re-import the image"
        )
    _flush(db, *rows)
    _write_meta(db, image, blocks, next_ino - ROOT_INO)


def _flush(db: sqlite3.Connection, inodes: list, dirents: list, xattrs: list) -> None:
    db.executemany("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", inodes)
    db.executemany("INSERT INTO dirents VALUES (?,?,?)", dirents)
    db.executemany("INSERT INTO xattrs VALUES (?,?,?)", xattrs)
    inodes.clear()
    dirents.clear()
    xattrs.clear()

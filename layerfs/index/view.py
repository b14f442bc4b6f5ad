"""ImageView: the merged tree of an image, answered from its SQLite index.

Nothing of the tree is loaded up front: each lookup is one primary-key query
(parent inode, name), and recent answers are kept in small bounded caches
(path to node, inode to chunk list), so a mount of a large image starts at once
and stays small. With ``read_ahead`` sequential reads fetch the next chunks on
worker threads (layerfs.index.readahead). Each thread gets its own read-only
connection; the index file never changes once built, so it is opened
``immutable`` (no locking).
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, TypeVar

from layerfs.errors import StoreError
from layerfs.index.build import INDEX_FORMAT, ROOT_INO, fs_bytes, fs_text, unpack_chunks
from layerfs.index.readahead import ReadAhead
from layerfs.records import Entry, Kind
from layerfs.store.chunks import ChunkRef, ChunkStore, chunk_offsets
from layerfs.view import FsStats, Node

K = TypeVar("K")
V = TypeVar("V")

_NODE_COLUMNS = "i.ino, i.kind, i.mode, i.uid, i.gid, i.size, i.mtime_ns, i.nlink, " + (
    "i.rdev_major, i.rdev_minor, i.target"
)
_MISSING = object()
_LISTING_MAX = 1000  # longer listings are not kept
_TYPE_BITS = {kind.value: Entry("", kind).st_mode for kind in Kind}


class _LRU(Generic[K, V]):
    """A thread-safe mapping bounded in entries, dropping the least recently used."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: OrderedDict[K, V] = OrderedDict()
        self.mutex = threading.Lock()

    def get(self, key: K, default: object = _MISSING) -> V | object:
        with self.mutex:
            value = self.items.get(key, default)
            if value is not default:
                self.items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self.mutex:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.limit:
                self.items.popitem(last=False)


def _node(row: tuple) -> Node:
    ino, kind, mode, uid, gid, size, mtime_ns, nlink, major, minor, target = row
    return Node(
        ino=ino,
        kind=Kind(kind),
        mode=mode,
        uid=uid,
        gid=gid,
        size=size,
        mtime_ns=mtime_ns,
        nlink=nlink,
        rdev=(major, minor),
        target=fs_text(target) if target is not None else "",
        key=ino,
    )


def _file_contents(db: sqlite3.Connection) -> Iterator[tuple[int, int, bytes | None, bytes | None]]:
    yield from db.execute(
        "SELECT ino, size, inline, chunks FROM inodes WHERE kind = ? AND size > 0 ORDER BY ino",
        (Kind.FILE.value,),
    )


def file_contents(index: Path) -> Iterator[tuple[int, int, bytes | None, bytes | None]]:
    """ImageView.file_contents of an index, without a store (e.g. to list what it uses)."""
    db = sqlite3.connect(f"file:{index}?mode=ro&immutable=1", uri=True)
    try:
        yield from _file_contents(db)
    finally:
        db.close()


class ImageView:
    """A layerfs.view.View over an image index built by layerfs.index.build."""

    def __init__(
        self,
        store: ChunkStore,
        index: Path,
        cache_entries: int = 100_000,
        read_ahead: bool = False,
    ) -> None:
        self.store = store
        self._ahead = ReadAhead(store.get_chunk) if read_ahead else None
        self.index = Path(index)
        self._local = threading.local()
        self._nodes: _LRU[str, Node | None] = _LRU(cache_entries)
        self._content: _LRU[int, tuple[bytes | None, list[ChunkRef], list[int]]] = _LRU(4096)
        self._listings: _LRU[int, list[tuple[bytes, int, int]]] = _LRU(2048)
        meta = dict(self._db().execute("SELECT key, value FROM meta"))
        if meta.get("format") != str(INDEX_FORMAT):
            raise StoreError(f"the image index {self.index} has an unknown format: remove it")
        self._stats = FsStats(
            blocks=int(meta["blocks"]), files=int(meta["files"]), bsize=int(meta["bsize"])
        )
        self.root = self._by_ino(ROOT_INO)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(
                    f"file:{self.index}?mode=ro&immutable=1", uri=True, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the image index {self.index}: {exc}") from exc
            self._local.db = db
        return db

    def _by_ino(self, ino: int) -> Node:
        row = (
            self._db()
            .execute(f"SELECT {_NODE_COLUMNS} FROM inodes i WHERE i.ino = ?", (ino,))
            .fetchone()
        )
        if row is None:
            raise StoreError(f"the image index {self.index} has no inode {ino}: remove it")
        return _node(row)

    # -- View ------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        if not path:
            return self.root
        node = self._nodes.get(path)
        if node is not _MISSING:
            return node  # type: ignore[return-value]
        parent_path, _, name = path.rpartition("/")
        parent = self.lookup(parent_path)
        found = None
        if parent is not None and parent.kind is Kind.DIR:
            row = (
                self._db()
                .execute(
                    f"SELECT {_NODE_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
                    "WHERE d.parent = ? AND d.name = ?",
                    (parent.ino, fs_bytes(name)),
                )
                .fetchone()
            )
            found = _node(row) if row is not None else None
        self._nodes.put(path, found)
        return found

    def listdir(self, path: str) -> list[str]:
        return [name for name, _ in self.scandir(path)]

    def scandir(self, path: str) -> list[tuple[str, Node]]:
        """Children of a directory with their nodes (one query; fills the lookup cache)."""
        parent = self.lookup(path)
        if parent is None or parent.kind is not Kind.DIR:
            return []
        rows = self._db().execute(
            f"SELECT d.name, {_NODE_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? ORDER BY d.name",
            (parent.ino,),
        )
        out = []
        prefix = f"{path}/" if path else ""
        for row in rows:
            name = fs_text(row[0])
            node = _node(row[1:])
            self._nodes.put(prefix + name, node)
            out.append((name, node))
        return out

    def dirents(self, path: str) -> list[tuple[bytes, int, int]]:
        """Children of a directory as (name as bytes, inode number, st_mode), for readdir.

        One query over the (parent, name) key; the kernel caches no listing, so
        a small number of recent ones are kept (each walk of a tree asks again).
        """
        parent = self.lookup(path)
        if parent is None or parent.kind is not Kind.DIR:
            return []
        cached = self._listings.get(parent.ino)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        rows = self._db().execute(
            "SELECT d.name, d.ino, i.kind, i.mode FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ?",
            (parent.ino,),
        )
        bits = _TYPE_BITS
        listing = [(name, ino, bits[kind] | mode) for name, ino, kind, mode in rows]
        if len(listing) <= _LISTING_MAX:
            self._listings.put(parent.ino, listing)
        return listing

    def _content_of(self, ino: int) -> tuple[bytes | None, list[ChunkRef], list[int]]:
        cached = self._content.get(ino)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        query = "SELECT inline, chunks FROM inodes WHERE ino = ?"
        row = self._db().execute(query, (ino,)).fetchone()
        inline, packed = row if row is not None else (None, None)
        chunks = unpack_chunks(packed) if packed else []
        value = (inline, chunks, chunk_offsets(chunks))
        self._content.put(ino, value)
        return value

    def read(self, node: Node, offset: int, size: int) -> bytes:
        if node.kind is not Kind.FILE or offset >= node.size:
            return b""
        size = min(size, node.size - offset)
        inline, chunks, offsets = self._content_of(node.ino)
        if inline is not None:
            return inline[offset : offset + size]
        ahead = self._ahead
        if ahead is None:
            return self.store.read(chunks, offsets, offset, size)
        ahead.wait_for(chunks, offsets, offset, offset + size)
        data = self.store.read(chunks, offsets, offset, size)
        ahead.after_read(node.ino, chunks, offsets, offset, offset + size)
        return data

    def chunk_offsets(self, node: Node) -> list[int]:
        """Start offset of each stored chunk of a regular file (empty when stored inline).

        Writable mounts copy a lower file up chunk by chunk along these offsets.
        """
        if node.kind is not Kind.FILE:
            return []
        inline, _chunks, offsets = self._content_of(node.ino)
        return [] if inline is not None else list(offsets)

    def xattrs(self, node: Node) -> dict[str, bytes]:
        rows = self._db().execute("SELECT name, value FROM xattrs WHERE ino = ?", (node.ino,))
        return {fs_text(name): value for name, value in rows}

    def statfs(self) -> FsStats:
        return self._stats

    # -- by inode number (the image view daemon, layerfs.fs.imageview) -------------
    def node(self, ino: int) -> Node | None:
        """The node with inode number ``ino``, or None."""
        row = (
            self._db()
            .execute(f"SELECT {_NODE_COLUMNS} FROM inodes i WHERE i.ino = ?", (ino,))
            .fetchone()
        )
        return _node(row) if row is not None else None

    def child(self, parent: int, name: bytes) -> Node | None:
        """The node named ``name`` in directory ``parent``, or None."""
        row = (
            self._db()
            .execute(
                f"SELECT {_NODE_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
                "WHERE d.parent = ? AND d.name = ?",
                (parent, name),
            )
            .fetchone()
        )
        return _node(row) if row is not None else None

    def children(self, parent: int) -> list[tuple[bytes, Node]]:
        """The entries of directory ``parent`` as (name, node), sorted by name."""
        rows = self._db().execute(
            f"SELECT d.name, {_NODE_COLUMNS} FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent = ? ORDER BY d.name",
            (parent,),
        )
        return [(row[0], _node(row[1:])) for row in rows]

    def stored_content(self, ino: int) -> tuple[bytes | None, bytes | None]:
        """What the index records for a file's content: (inline bytes, packed chunk list)."""
        row = self._db().execute("SELECT inline, chunks FROM inodes WHERE ino = ?", (ino,))
        found = row.fetchone()
        return (found[0], found[1]) if found is not None else (None, None)

    def file_contents(self) -> Iterator[tuple[int, int, bytes | None, bytes | None]]:
        """Every non-empty regular file as (ino, size, inline bytes, packed chunk list),
        read lazily (for one thread's long walk)."""
        yield from _file_contents(self._db())

    def content_refs(self, packed: bytes) -> list[ChunkRef]:
        """A packed chunk list (as ``stored_content`` gives it) as chunk references."""
        return unpack_chunks(packed)

    def close(self) -> None:
        """Stop fetching ahead; close this thread's connection (others close with their threads)."""
        if self._ahead is not None:
            self._ahead.close()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

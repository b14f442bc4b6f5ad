"""Records shared by every part of the store: one filesystem entry, and a tree of them.

A *tree record* is the list of entries of one layer (in tar order, whiteouts
included) or of one backup snapshot. Paths are relative, '/'-separated, without
a leading './' or '/'; the root directory is ''. Non-UTF-8 names survive as
surrogate escapes. Two encodings, both stored as records in the
content-addressed store (deduplicated like file content):

* format 1, a *flat* tree: one JSON document holding every entry in order
  (image layers whose tar order a directory tree would not keep);
* format 2, a *directory* tree (backups, and layers in the depth-first order
  Docker writes; a Merkle tree, as restic and git keep): one node record per
  directory listing its entries by name, a
  directory entry naming its own node, and a small root record naming the
  root node. Equal directories are equal nodes with equal IDs, so a backup
  after a small change writes only the nodes on the paths from the changed
  entries to the root, and reuses every other node by ID. Reading walks the
  nodes depth first and yields the entries in the order a walk that lists each
  directory right after its entry (and children in the order given) wrote them.
"""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from layerfs.formats.paths import BadPath, check_stored
from layerfs.store.chunks import ChunkRef, ChunkStore

TREE_FORMAT = 1
DIR_TREE_FORMAT = 2
MAX_DEPTH = 2048  # directory levels a directory tree may have (PATH_MAX allows no more)


class BadTree(ValueError):
    """A tree record that is malformed or names a path no restore may write."""


class Kind(StrEnum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    HARDLINK = "h"  # target names another entry path (in this or a lower layer)
    CHAR = "c"
    BLOCK = "b"
    FIFO = "p"
    SOCKET = "s"
    WHITEOUT = "w"  # hides `path` in lower layers
    OPAQUE = "o"  # hides every lower child of directory `path`


# File type bits of each kind (a hard link is a regular file).
S_IFMT_OF: dict[str, int] = {
    Kind.FILE: stat.S_IFREG,
    Kind.HARDLINK: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
}


_KIND_OF = {k.value: k for k in Kind}  # Kind by its JSON value, without Enum's lookup
# JSON values of the kinds a tree walk tests for each entry (an Enum's .value is a lookup)
_DIR, _HARDLINK, _OPAQUE = Kind.DIR.value, Kind.HARDLINK.value, Kind.OPAQUE.value


def kind_from_mode(mode: int) -> Kind:
    """The Kind of an st_mode (regular files are FILE)."""
    for kind, fmt in S_IFMT_OF.items():
        if kind is not Kind.HARDLINK and stat.S_IFMT(mode) == fmt:
            return kind
    raise ValueError(f"unknown file type in mode {mode:o}")


@dataclass(slots=True)
class Entry:
    """One filesystem entry: metadata plus content (chunks, or inline if tiny)."""

    path: str
    kind: Kind
    mode: int = 0o644  # permission bits only, including setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""  # symlink target, or hardlink target path
    rdev: tuple[int, int] = (0, 0)  # device major, minor
    xattrs: dict[str, bytes] = field(default_factory=dict)
    chunks: list[ChunkRef] = field(default_factory=list)
    inline: bytes | None = None

    @property
    def st_mode(self) -> int:
        return S_IFMT_OF.get(self.kind, 0) | (self.mode & 0o7777)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rsplit("/", 1)[0] if "/" in self.path else ""

    def to_json(self) -> dict:
        d: dict = {"p": self.path, "k": self.kind.value}
        if self.kind in (Kind.WHITEOUT, Kind.OPAQUE):
            return d
        d.update(m=self.mode, u=self.uid, g=self.gid, t=self.mtime_ns)
        if self.size:
            d["s"] = self.size
        if self.target:
            d["l"] = self.target
        if self.rdev != (0, 0):
            d["d"] = list(self.rdev)
        if self.xattrs:
            d["x"] = {k: _b64(v) for k, v in self.xattrs.items()}
        if self.chunks:
            d["c"] = [[c.digest, c.size] for c in self.chunks]
        if self.inline is not None:
            d["i"] = _b64(self.inline)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Entry:
        """The entry of a document in ``to_json``'s form (checked by ``decode_tree_docs``).

        Every tree read goes through here, once per entry: fields are passed in
        order, and absent ones cost no allocation.
        """
        x, c, i, r = d.get("x"), d.get("c"), d.get("i"), d.get("d")
        return cls(
            d["p"],
            _KIND_OF[d["k"]],
            d.get("m", 0),
            d.get("u", 0),
            d.get("g", 0),
            d.get("t", 0),
            d.get("s", 0),
            d.get("l", ""),
            (0, 0) if r is None else tuple(r),
            {} if x is None else {k: _unb64(v) for k, v in x.items()},
            [] if c is None else [ChunkRef(digest, size) for digest, size in c],
            None if i is None else _unb64(i),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def encode_tree(entries: list[Entry], meta: dict | None = None) -> bytes:
    """Serialise a tree record (entries in order, plus optional metadata)."""
    return encode_tree_docs([e.to_json() for e in entries], meta)


def decode_tree(data: bytes) -> tuple[list[Entry], dict]:
    """Parse and check a tree record into (entries, metadata); BadTree if it is malformed."""
    docs, meta = decode_tree_docs(data)
    try:
        return [Entry.from_json(e) for e in docs], meta
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BadTree(f"tree entry malformed: {exc!r}") from None


def encode_tree_docs(docs: list[dict], meta: dict | None = None) -> bytes:
    """Serialise a tree record from entries already in their JSON form (Entry.to_json)."""
    doc = {"format": TREE_FORMAT, "meta": meta or {}, "entries": docs}
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


_KINDS = frozenset(k.value for k in Kind)
# Kinds that cannot have children: an entry below one of them in the same tree is refused.
_LEAF_KINDS = frozenset(
    k.value
    for k in (Kind.FILE, Kind.HARDLINK, Kind.SYMLINK, Kind.CHAR, Kind.BLOCK, Kind.FIFO, Kind.SOCKET)
)


def decode_tree_docs(data: bytes) -> tuple[list[dict], dict]:
    """Parse a tree record into (entries in their JSON form, metadata), checking every entry.

    Each entry's path (and a hard link's target) must be a stored path
    (``formats.paths.check_stored``), its kind known, and no entry may lie below
    an entry of the same tree that is not a directory. Raises BadTree naming the
    offending path.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadTree(f"tree record is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != TREE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BadTree(f"unsupported tree record format {found!r}")
    docs, meta = doc.get("entries"), doc.get("meta", {})
    if not isinstance(docs, list) or not isinstance(meta, dict):
        raise BadTree("tree record has no list of entries")
    check_docs(docs)
    return docs, meta


def check_docs(docs: list[dict]) -> None:
    """Refuse entries whose paths or kinds could not be restored safely (see decode_tree_docs)."""
    leaves: set[str] = set()
    for d in docs:
        if check_doc(d):
            leaves.add(d["p"])
    if leaves:
        for d in docs:
            path = d["p"]
            while "/" in path:
                path = path.rsplit("/", 1)[0]
                if path in leaves:
                    raise BadTree(
                        f"tree entry {d['p']!r} lies below {path!r}, which is not a directory"
                    )


def check_doc(d: object) -> bool:
    """Refuse one entry whose path, link target or kind is unsafe; return whether it is a leaf
    (an entry that cannot have entries below it)."""
    if not isinstance(d, dict):
        raise BadTree(f"tree entry {d!r} is not an object")
    try:
        check_stored(d.get("p"))  # type: ignore[arg-type]
    except BadPath as exc:
        raise BadTree(f"tree entry refused: {exc}") from None
    return _check_kind(d)


def _check_kind(d: dict) -> bool:
    """check_doc for an entry whose path is known to be a stored path."""
    kind = d.get("k")
    if kind == _HARDLINK:
        try:
            check_stored(d.get("l"))  # type: ignore[arg-type]
        except BadPath as exc:
            raise BadTree(f"tree entry refused: {exc}") from None
    if kind not in _KINDS:
        raise BadTree(f"tree entry {d.get('p')!r} has an unknown kind {kind!r}")
    return kind in _LEAF_KINDS


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


class DirTreeWriter:
    """Writes a directory tree (format 2) from entries given in walk order, node by node.

    Entries come as ``add`` calls in the order a depth-first walk meets them:
    the root entry '' first (if any), then each entry after its parent
    directory's entry and each directory's entries before anything outside it
    (``keeps_order_as_dir_tree``). A directory's node is written as soon as the
    walk leaves it, so only the directories on the current path are in memory.
    ``extra`` values are kept beside their entries (a backup's inode and ctime)
    and come back from ``read_tree``. ``finish`` writes the root record.
    """

    def __init__(self, store: ChunkStore, meta: dict | None = None) -> None:
        self.store = store
        self.meta = meta or {}
        self._root_doc: dict | None = None
        self._root: str | None = None
        # the open directories: (path, entries so far, the entry that names its node)
        self._open: list[tuple[str, list[dict], dict | None]] = [("", [], None)]
        self._started = False

    def add(self, doc: dict, extra: object = None) -> None:
        path = doc["p"]
        opaque = doc["k"] == Kind.OPAQUE.value
        if path == "" and not opaque:
            if self._started:
                raise ValueError("the root entry must come first")
            self._root_doc = dict(doc) if extra is None else {**doc, "z": extra}
            self._started = True
            return
        self._started = True
        if opaque:  # a directory's opaque mark is an item of its own node, named ""
            folder, name = path, ""
        else:
            folder, _, name = path.rpartition("/")
        while self._open and self._open[-1][0] != folder:
            self._close()
        if not self._open:
            raise ValueError(
                f"entry {path!r} is not right below an open directory: out of walk order, "
                "or below what is not a directory"
            )
        item = {**doc, "p": name}
        if extra is not None:
            item["z"] = extra
        self._open[-1][1].append(item)
        if doc["k"] == Kind.DIR.value:
            self._open.append((path, [], item))

    def _close(self) -> None:
        _path, items, owner = self._open.pop()
        if not items:
            return
        node = self.store.put_record(_dumps({"format": DIR_TREE_FORMAT, "node": items}))
        if owner is None:
            self._root = node
        else:
            owner["n"] = node

    def finish(self) -> str:
        """Write the nodes still open and the root record; return the root record's ID."""
        while self._open:
            self._close()
        root = {
            "format": DIR_TREE_FORMAT,
            "meta": self.meta,
            "root": self._root,
            "self": self._root_doc,
        }
        return self.store.put_record(_dumps(root))


def put_dir_tree(
    store: ChunkStore,
    docs: list[dict],
    meta: dict | None = None,
    extras: list | None = None,
) -> str:
    """Store entries (JSON form, in walk order) as a directory tree; return its root's ID.

    See DirTreeWriter; ``extras``, if given, holds one value per entry.
    """
    if extras is not None and len(extras) != len(docs):
        raise ValueError("extras must hold one value per entry")
    writer = DirTreeWriter(store, meta)
    for i, doc in enumerate(docs):
        writer.add(doc, None if extras is None else extras[i])
    return writer.finish()


@dataclass
class TreeRead:
    """A tree as read: entries (JSON form, checked), metadata, the records it is made of,
    and the ``extras`` stored beside the entries (None for a flat tree)."""

    docs: list[dict]
    meta: dict
    records: list[str]
    extras: list | None = None


def _load_json(store: ChunkStore, digest: str) -> dict:
    try:
        doc = json.loads(store.get_record(digest))
    except (ValueError, RecursionError) as exc:
        raise BadTree(f"tree record {digest} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadTree(f"tree record {digest} is not a JSON object")
    return doc


def read_node(store: ChunkStore, node_id: str, folder: str = "") -> list:
    """The items of one directory node of a directory tree (not yet checked one by one)."""
    node = _load_json(store, node_id)
    items = node.get("node")
    if node.get("format") != DIR_TREE_FORMAT or not isinstance(items, list):
        raise BadTree(f"node {node_id} of {folder or 'the root'!r} is malformed")
    return items


def dir_tree_root(store: ChunkStore, digest: str) -> str | None:
    """The root node's ID of the directory tree ``digest`` (None: no entries below the root).

    BadTree if ``digest`` is not a directory tree's root record.
    """
    head = _load_json(store, digest)
    if head.get("format") != DIR_TREE_FORMAT or "node" in head:
        raise BadTree(f"tree record {digest} is not the root of a directory tree")
    try:
        return _head_root(head)
    except BadTree as exc:
        raise BadTree(f"tree record {digest}: {exc}") from None


def _head_root(head: dict) -> str | None:
    """The root node a directory tree's root record names; BadTree if it is malformed."""
    root = head.get("root")
    if not isinstance(head.get("meta", {}), dict) or not (root is None or isinstance(root, str)):
        raise BadTree("its root record is malformed")
    return root


@contextmanager
def _naming(what: str) -> Iterator[None]:
    """Turn what a malformed record raises into BadTree naming ``what``."""
    try:
        yield
    except BadTree as exc:
        raise BadTree(f"{what}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BadTree(f"{what}: tree entry malformed: {exc!r}") from None


def read_tree(store: ChunkStore, digest: str) -> TreeRead:
    """Load and check a tree record of either format; BadTree names what is wrong."""
    data = store.get_record(digest)
    try:
        head = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadTree(f"tree record {digest} is not valid JSON: {exc}") from None
    if isinstance(head, dict) and head.get("format") == DIR_TREE_FORMAT:
        try:
            return _read_dir_tree(store, digest, head)
        except BadTree as exc:
            raise BadTree(f"tree record {digest}: {exc}") from None
    try:
        docs, meta = decode_tree_docs(data)
    except BadTree as exc:
        raise BadTree(f"tree record {digest}: {exc}") from None
    return TreeRead(docs, meta, [digest])


def _take(item: object, path: str) -> tuple[dict, object, str | None]:
    """(entry document at ``path``, its extra, the node it names) of a node's item."""
    if not isinstance(item, dict):
        raise BadTree(f"entry {item!r} is not an object")
    doc = dict(item)
    node = doc.pop("n", None)
    extra = doc.pop("z", None)
    doc["p"] = path
    if node is not None and (not isinstance(node, str) or doc.get("k") != _DIR):
        raise BadTree(f"entry {path!r} names a node but is not a directory")
    return doc, extra, node


def _item_path(item: object, folder: str) -> str:
    """The full path of a node's item in ``folder``, a stored path; BadTree unless it
    names one component that a stored path may hold (or is the directory's opaque
    mark, named "": its path is the directory's)."""
    name = item.get("p") if isinstance(item, dict) else None
    if isinstance(item, dict) and item.get("k") == _OPAQUE and name == "":
        return folder
    if not isinstance(name, str) or not name or "/" in name:
        raise BadTree(f"an entry of {folder or 'the root'!r} has no single name: {name!r}")
    try:
        check_stored(name)
    except BadPath as exc:
        raise BadTree(f"tree entry refused: {exc}") from None
    return f"{folder}/{name}" if folder else name


_Item = tuple[dict, object, str | None]  # entry JSON (full path), extra, the node it names


def _node_items(store: ChunkStore, node_id: str, folder: str) -> list[_Item]:
    """(entry JSON with its full path, extra, the node it names) of each item of the
    node of directory ``folder``; BadTree unless every name is one component, only
    directories name nodes, and no name repeats."""
    out: list[_Item] = []
    names: set[str] = set()
    for item in read_node(store, node_id, folder):
        path = _item_path(item, folder)
        if path in names:
            raise BadTree(f"{folder or 'the root'!r} holds {item['p']!r} twice")
        names.add(path)
        out.append(_take(item, path))
    return out


def _walk_dir_tree(
    store: ChunkStore, head: dict, records: list[str] | None = None, folder: str = ""
) -> Iterator[tuple[dict, object]]:
    """(entry JSON with its full path, extra) of a directory tree, depth first.

    Checks the structure as it goes (``_node_items``; nesting stays within
    MAX_DEPTH). The IDs of the nodes read are appended to ``records``. A walk
    below directory ``folder`` starts from a head of just its node (``root``).
    """
    root, self_doc = _head_root(head), head.get("self")
    _check_folder(folder)

    def items_of(node_id: str, folder: str, level: int) -> Iterator[_Item]:
        if level > MAX_DEPTH:
            raise BadTree(f"directory {folder!r} is nested deeper than {MAX_DEPTH} levels")
        items = _node_items(store, node_id, folder)
        if records is not None:
            records.append(node_id)
        return iter(items)

    if self_doc is not None:
        doc, extra, _ = _take(self_doc, "")
        yield doc, extra
    # depth first: a directory's entries follow its own entry, before its next sibling
    start = folder.count("/") + 2 if folder else 1
    stack = [(items_of(root, folder, start), start)] if root else []
    while stack:
        items, level = stack[-1]
        found = next(items, None)
        if found is None:
            stack.pop()
            continue
        doc, extra, child = found
        yield doc, extra
        if child is not None:
            stack.append((items_of(child, doc["p"], level + 1), level + 1))


def _read_dir_tree(store: ChunkStore, digest: str, head: dict) -> TreeRead:
    docs: list[dict] = []
    extras: list = []
    records = [digest]
    for doc, extra in _walk_dir_tree(store, head, records):
        docs.append(doc)
        extras.append(extra)
    check_docs(docs)
    return TreeRead(docs, head.get("meta", {}), records, extras)


def iter_tree(store: ChunkStore, digest: str) -> Iterator[Entry]:
    """The entries of a tree of either format, checked one by one, in order.

    A directory tree is read one node at a time, so memory follows the
    directories on the current path, not the tree's size. Each entry is checked
    as ``decode_tree_docs`` checks a flat tree (a directory tree's structure
    already keeps entries below directories only); BadTree names the record.
    """
    head = _load_json(store, digest)
    if head.get("format") != DIR_TREE_FORMAT:
        yield from get_tree(store, digest)[0]
        return
    yield from _checked(_walk_dir_tree(store, head), f"tree record {digest}")


def iter_below(store: ChunkStore, node_id: str, folder: str) -> Iterator[Entry]:
    """The entries below directory ``folder`` of a directory tree, given its node, as
    ``iter_tree`` gives them (full paths, depth first, checked)."""
    walk = _walk_dir_tree(store, {"root": node_id}, folder=folder)
    yield from _checked(walk, f"node {node_id} of {folder or 'the root'!r}")


def _checked(walk: Iterator[tuple[dict, object]], what: str) -> Iterator[Entry]:
    with _naming(what):
        for doc, _extra in walk:
            yield _entry(doc)


def _check_folder(folder: str) -> None:
    """Refuse a folder to walk below that is not a stored path: the paths of the
    entries below it are the folder and names ``_item_path`` checked."""
    try:
        check_stored(folder)
    except BadPath as exc:
        raise BadTree(f"cannot read below {folder!r}: {exc}") from None


def _entry(doc: dict) -> Entry:
    """The Entry of a document from a directory tree's walk: its path is a stored path
    already (a checked folder and names), so what is left to check is its kind."""
    _check_kind(doc)
    return Entry.from_json(doc)


def node_entries(store: ChunkStore, node_id: str, folder: str) -> list[tuple[Entry, str | None]]:
    """The entries of one directory node (full paths, checked) with the node each
    subdirectory names (None for other entries); BadTree names the node."""
    with _naming(f"node {node_id}"):
        _check_folder(folder)
        return [(_entry(doc), child) for doc, _extra, child in _node_items(store, node_id, folder)]


def _root_entry(head: dict) -> Entry | None:
    """The entry of a directory tree's root directory, if its root record has one."""
    self_doc = head.get("self")
    return None if self_doc is None else _entry(_take(self_doc, "")[0])


def find_entry(store: ChunkStore, digest: str, path: str) -> Entry | None:
    """The entry at ``path`` of tree ``digest`` (None if it has none), reading only the
    directory nodes on the way to it (a flat tree is read whole)."""
    head = _load_json(store, digest)
    if head.get("format") != DIR_TREE_FORMAT:
        return next((e for e in get_tree(store, digest)[0] if e.path == path), None)
    with _naming(f"tree record {digest}"):
        if not path:
            return _root_entry(head)
        node, entry = _head_root(head), None
        for name in path.split("/"):
            if node is None:
                return None
            folder = entry.path if entry is not None else ""
            children = node_entries(store, node, folder)
            found = next((ec for ec in children if ec[0].name == name), None)
            if found is None:
                return None
            entry, node = found
        return entry


def new_records(
    store: ChunkStore, digest: str, is_new: Callable[[str, str | None], bool]
) -> Iterator[list[Entry]]:
    """The entries of tree ``digest`` one record at a time, skipping records seen before.

    ``is_new(id, path)`` is asked for the tree record (path None), then for each
    directory node (path: the directory it lists) just before it is read. A
    record it answers False for is not read, and neither is anything below it:
    equal IDs are equal subtrees, so a walk over many backups of one volume reads
    each distinct directory once (how gc marks). Entries carry their full path.
    BadTree names the tree; a failure is in the record ``is_new`` was last asked
    about and answered True.
    """
    if not is_new(digest, None):
        return
    head = _load_json(store, digest)
    if head.get("format") != DIR_TREE_FORMAT:
        yield get_tree(store, digest)[0]
        return
    with _naming(f"tree record {digest}"):
        root, self_entry = _head_root(head), _root_entry(head)
        yield [] if self_entry is None else [self_entry]
        stack = [(root, "", 1)] if root else []
        while stack:
            node_id, folder, level = stack.pop()
            if level > MAX_DEPTH:
                raise BadTree(f"directory {folder!r} is nested deeper than {MAX_DEPTH} levels")
            if not is_new(node_id, folder):
                continue
            found = node_entries(store, node_id, folder)
            stack.extend((child, e.path, level + 1) for e, child in found if child is not None)
            yield [e for e, _child in found]


def keeps_order_as_dir_tree(docs: list[dict]) -> bool:
    """Whether a directory tree of ``docs`` reads back in the same order.

    So it does when the root entry (if any) comes first, every other entry's
    parent is the root or a directory entry before it, no path repeats, and
    each directory's entries follow it before anything outside it: the order
    Docker and BuildKit write layer tars in (a depth-first walk).
    """
    open_dirs = [""]
    seen: set[str] = set()
    opaque: set[str] = set()
    for i, d in enumerate(docs):
        path = d["p"]
        if d["k"] == Kind.OPAQUE.value:  # inside the directory it marks, once
            parent = path
            if path in opaque:
                return False
            opaque.add(path)
        elif path == "":
            if i:
                return False
            continue
        else:
            if path in seen:
                return False
            seen.add(path)
            parent = path.rpartition("/")[0]
        while open_dirs and open_dirs[-1] != parent:
            open_dirs.pop()
        if not open_dirs:
            return False
        if d["k"] == Kind.DIR.value:
            open_dirs.append(path)
    return True


def put_tree(store: ChunkStore, entries: list[Entry], meta: dict | None = None) -> str:
    """Store a layer's entries; return the ID of the tree record.

    A directory tree (format 2) when it reads back in the same order (see
    ``keeps_order_as_dir_tree``), so equal directories of different layers and
    images are one node; otherwise a flat record (format 1), which keeps any
    order: a layer's export must give back its tar byte for byte.
    """
    docs = [e.to_json() for e in entries]
    if keeps_order_as_dir_tree(docs):
        return put_dir_tree(store, docs, meta)
    return store.put_record(encode_tree_docs(docs, meta))


def get_tree(store: ChunkStore, digest: str) -> tuple[list[Entry], dict]:
    """Load and check a tree record of either format as entries; BadTree names the record."""
    read = read_tree(store, digest)
    try:
        return [Entry.from_json(e) for e in read.docs], read.meta
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BadTree(f"tree record {digest}: tree entry malformed: {exc!r}") from None


def read_content(store: ChunkStore, entry: Entry) -> bytes:
    """The whole content of a file entry (inline or chunked)."""
    if entry.inline is not None:
        return entry.inline
    return b"".join(store.iter_content(entry.chunks))

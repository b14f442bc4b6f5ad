"""Merge the tree records of an image's layers into one tree, as the Docker daemon applies them.

Layers apply bottom first. Within one layer, whiteouts (``Kind.WHITEOUT``) and
opaque markers (``Kind.OPAQUE``) act on the lower layers only, wherever they sit
in the tar, so they are applied before the layer's other entries. Directory
over directory merges and takes the upper attributes; anything else replaces
what was there. A hardlink resolves against the tree built so far (this layer's
earlier entries and every lower layer) and shares the target's inode, so every
path of one inode shows the same attributes and content, and st_nlink counts
the paths that are still visible in the merged tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from layerfs.errors import LayerfsError
from layerfs.index.build import ROOT_INO
from layerfs.records import Entry, Kind


class MergeError(LayerfsError):
    """A layer cannot be applied on top of the ones below it."""


@dataclass(slots=True, eq=False)
class Inode:
    """A non-directory inode; hardlinked paths share one object."""

    entry: Entry  # attributes and content; kind is never HARDLINK
    ino: int = 0
    nlink: int = 0


@dataclass(slots=True, eq=False)
class Dir:
    """A directory of the merged tree: its attributes and its children by name."""

    entry: Entry
    children: dict[str, Dir | Inode] = field(default_factory=dict)
    ino: int = 0
    nlink: int = 2


Node = Dir | Inode


def _implicit_dir(path: str) -> Entry:
    """A directory a layer needs but does not list: root-owned 0755, like the daemon makes."""
    return Entry(path, Kind.DIR, mode=0o755)


def _split(path: str) -> list[str]:
    return path.split("/") if path else []


class MergedTree:
    """The merged tree of a stack of layers; call ``apply`` once per layer, bottom first."""

    def __init__(self) -> None:
        self.root = Dir(_implicit_dir(""))
        self._removed: dict[str, Node] = {}  # paths hidden by the current layer's markers

    # -- lookups ---------------------------------------------------------------
    @staticmethod
    def _walk(node: Node | None, parts: list[str]) -> Node | None:
        for part in parts:
            if not isinstance(node, Dir):
                return None
            node = node.children.get(part)
        return node

    def find(self, path: str) -> Node | None:
        """The node at ``path`` in the tree built so far, or None."""
        return self._walk(self.root, _split(path))

    def _find_hidden(self, path: str) -> Node | None:
        """A node this layer's markers hid (hardlinks may still name it)."""
        parts = _split(path)
        for i in range(len(parts), 0, -1):
            top = self._removed.get("/".join(parts[:i]))
            if top is not None:
                return self._walk(top, parts[i:])
        return None

    def _parent(self, entry: Entry) -> Dir:
        node = self.root
        for i, part in enumerate(_split(entry.parent)):
            child = node.children.get(part)
            if not isinstance(child, Dir):
                if child is not None:
                    raise MergeError(
                        f"layer entry {entry.path!r} lies under "
                        f"{'/'.join(_split(entry.parent)[: i + 1])!r}, which is not a directory; "
                        "the layer is damaged: re-import the image"
                    )
                child = Dir(_implicit_dir("/".join(_split(entry.parent)[: i + 1])))
                node.children[part] = child
            node = child
        return node

    # -- applying a layer ------------------------------------------------------
    def apply(self, entries: Iterable[Entry]) -> None:
        """Apply one layer's entries (in tar order) on top of the tree."""
        entries = list(entries)
        self._removed = {}
        for e in entries:
            if e.kind is Kind.WHITEOUT:
                self._whiteout(e.path)
            elif e.kind is Kind.OPAQUE:
                self._opaque(e.path)
        for e in entries:
            if e.kind not in (Kind.WHITEOUT, Kind.OPAQUE):
                self._add(e)
        self._removed = {}

    def _whiteout(self, path: str) -> None:
        if not path:
            return
        parent = self.find(path.rsplit("/", 1)[0] if "/" in path else "")
        if isinstance(parent, Dir):
            node = parent.children.pop(path.rsplit("/", 1)[-1], None)
            if node is not None:
                self._removed[path] = node

    def _opaque(self, path: str) -> None:
        node = self.find(path)
        if isinstance(node, Dir):
            for name, child in node.children.items():
                self._removed[f"{path}/{name}" if path else name] = child
            node.children = {}

    def _add(self, e: Entry) -> None:
        if not e.path:
            if e.kind is not Kind.DIR:
                raise MergeError("a layer replaces the root directory with a non-directory")
            self.root.entry = e
            return
        parent = self._parent(e)
        name = e.name
        if e.kind is Kind.DIR:
            old = parent.children.get(name)
            if isinstance(old, Dir):
                old.entry = e
            else:
                parent.children[name] = Dir(e)
        elif e.kind is Kind.HARDLINK:
            target = self.find(e.target)
            if target is None:
                target = self._find_hidden(e.target)
            if not isinstance(target, Inode):
                what = "a directory" if isinstance(target, Dir) else "a path that does not exist"
                raise MergeError(
                    f"hardlink {e.path!r} names {e.target!r}, {what}; "
                    "the layer is damaged: re-import the image"
                )
            parent.children[name] = target
        else:
            parent.children[name] = Inode(e)

    # -- result ----------------------------------------------------------------
    def finish(self) -> None:
        """Number the inodes (root 1, then depth first in name order) and count links."""
        next_ino = ROOT_INO
        stack: list[Dir] = [self.root]
        while stack:
            d = stack.pop()
            d.ino = next_ino
            next_ino += 1
            d.nlink = 2
            subdirs = []
            for name in sorted(d.children, key=_name_key):
                child = d.children[name]
                if isinstance(child, Dir):
                    d.nlink += 1
                    subdirs.append(child)
                else:
                    if child.nlink == 0:
                        child.ino = next_ino
                        next_ino += 1
                    child.nlink += 1
            stack.extend(reversed(subdirs))

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every (path, node) of the tree, root first, parents before children."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if isinstance(node, Dir):
                for name in sorted(node.children, key=_name_key, reverse=True):
                    stack.append((f"{path}/{name}" if path else name, node.children[name]))


def _name_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def merge_layers(layers: Iterable[Iterable[Entry]]) -> MergedTree:
    """Merge layers (bottom first) into a numbered tree."""
    tree = MergedTree()
    for entries in layers:
        tree.apply(entries)
    tree.finish()
    return tree

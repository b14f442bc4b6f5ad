"""Checking hardlink targets against the tree the layers build, bottom to top.

A hardlink entry must name a non-directory that appears earlier in the same
layer or exists in the merged tree of the layers below. Only paths and whether
they are directories are tracked, so the check is cheap even for big images.
"""

from __future__ import annotations

from layerfs.errors import ImportRejected
from layerfs.records import Entry, Kind

_Tree = dict[str, "_Tree | bool"]  # a directory; True marks a non-directory


class LinkChecker:
    """Apply layers in order; ``add_layer`` refuses dangling or bad hardlinks."""

    def __init__(self) -> None:
        self.root: _Tree = {}

    def add_layer(self, entries: list[Entry], label: str) -> None:
        """Check the hardlinks of one layer, then merge its paths into the tree."""
        here: dict[str, bool] = {}  # paths of this layer so far -> is a directory
        for e in entries:
            if e.kind is Kind.HARDLINK:
                is_dir = here.get(e.target)
                if is_dir is None:
                    is_dir = self._lookup(e.target)
                if is_dir is None:
                    raise ImportRejected(
                        f"{label}: entry {e.path!r}: hardlink to {e.target!r}, which is "
                        "neither earlier in this layer nor in a lower layer"
                    )
                if is_dir:
                    raise ImportRejected(
                        f"{label}: entry {e.path!r}: hardlink to the directory {e.target!r}"
                    )
            if e.kind not in (Kind.WHITEOUT, Kind.OPAQUE):
                here[e.path] = e.kind is Kind.DIR
        for e in entries:
            if e.kind is Kind.OPAQUE:
                node = self._node(e.path)
                if isinstance(node, dict):
                    node.clear()
            elif e.kind is Kind.WHITEOUT:
                parent, _, name = e.path.rpartition("/")
                node = self._node(parent)
                if isinstance(node, dict):
                    node.pop(name, None)
        for path, is_dir in here.items():
            self._add(path, is_dir)

    def _node(self, path: str) -> _Tree | bool | None:
        node: _Tree | bool = self.root
        for part in path.split("/") if path else []:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def _lookup(self, path: str) -> bool | None:
        """True for a directory, False for anything else, None if absent."""
        node = self._node(path)
        return None if node is None else isinstance(node, dict)

    def _add(self, path: str, is_dir: bool) -> None:
        if not path:
            return
        node = self.root
        parts = path.split("/")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = parts[-1]
        if not is_dir:
            node[last] = True
        elif not isinstance(node.get(last), dict):
            node[last] = {}

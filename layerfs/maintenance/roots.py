"""The roots of the live set: everything that keeps store objects alive.

A root names an owner (an image, a backup, a pin...) and the tree records and
plain objects it references. Built-in roots come from the store's docs:
``images/``, ``backups/`` and ``pins/``. Layer docs (``layers/``) are no roots:
they only let an import reuse a layer, and a layer goes with the last image that
uses it (``Catalog.remove_image``). Other parts of the
system add roots without touching this module, either by passing providers to
``all_roots`` or by declaring an entry point in the ``layerfs.roots`` group (a
callable taking the Backend and returning Roots).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points

from layerfs.catalog import Catalog
from layerfs.errors import StoreError
from layerfs.maintenance.pins import list_pins
from layerfs.store.backend import Backend

ENTRY_POINT_GROUP = "layerfs.roots"


@dataclass(frozen=True, slots=True)
class Root:
    """An owner of store objects: tree records (walked) and objects referenced directly.

    ``owner`` is what reports show; ``kind`` and ``id`` identify the owner for code
    (e.g. kind "backup" and the backup's id).
    """

    owner: str
    trees: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()
    kind: str = ""
    id: str = ""


RootProvider = Callable[[Backend], Iterable[Root]]


def _load_doc(backend: Backend, name: str) -> dict:
    try:
        return json.loads(backend.get_doc(name))
    except ValueError as exc:
        raise StoreError(
            f"document {name} in {backend.url} is not valid JSON ({exc}); repair or remove it"
        ) from exc


def image_roots(backend: Backend) -> Iterator[Root]:
    """One root per image: the tree records of its layers."""
    for image in Catalog(backend).images():
        trees = tuple(layer.tree for layer in image.layers)
        yield Root(f"image {image.name}", trees, kind="image", id=image.name)


def backup_roots(backend: Backend, volume: str | None = None) -> Iterator[Root]:
    """One root per backup doc ``backups/<id>.json`` (optionally of one volume)."""
    for name in backend.list_docs("backups/"):
        if not name.endswith(".json"):
            continue
        doc = _load_doc(backend, name)
        if volume is not None and doc.get("volume") != volume:
            continue
        label = f"backup {doc['id']} (volume {doc.get('volume', '?')})"
        yield Root(label, (doc["tree"],), kind="backup", id=doc["id"])


def pin_roots(backend: Backend) -> Iterator[Root]:
    """One root per pin (maintenance.pins): trees a restore or a lazy volume still reads."""
    for p in list_pins(backend):
        yield Root(f"pin {p.id} ({p.holder} on {p.host})", (p.tree,), kind="pin", id=p.id)


BUILTIN_PROVIDERS: tuple[RootProvider, ...] = (image_roots, backup_roots, pin_roots)


def plugin_providers() -> list[RootProvider]:
    """Root providers declared by installed packages in the ``layerfs.roots`` group."""
    return [ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)]


def all_roots(backend: Backend, extra: Iterable[RootProvider] = ()) -> Iterator[Root]:
    """Every root of the store: built-in docs, installed providers and ``extra``."""
    for provider in (*BUILTIN_PROVIDERS, *plugin_providers(), *extra):
        yield from provider(backend)

"""Pins: tree records that running work still reads (a restore, a lazy volume).

A pin is the document ``pins/<id>.json`` naming one tree record, who holds it and
since when. Every pin is a root of the live set, so neither gc nor a prune
(which may forget the backup the tree came from) removes what a restore or a
lazy volume is still reading. Take a pin under the store's shared lock, in the
same hold that found the tree, so a prune cannot slip in between; remove it
when the work is done. A pin left by a host that died stays until someone runs
``unpin`` (``volplugin`` lists pins with their holders).
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass

from layerfs.errors import ObjectMissing, StoreError
from layerfs.store.backend import Backend

PREFIX = "pins/"


@dataclass(frozen=True, slots=True)
class Pin:
    """One pin: the tree it keeps alive, its holder (host and what), and when it was taken."""

    id: str
    tree: str
    holder: str
    host: str
    since: float

    @property
    def doc_name(self) -> str:
        return f"{PREFIX}{self.id}.json"


def pin(backend: Backend, tree: str, holder: str, host: str | None = None) -> Pin:
    """Pin ``tree`` for ``holder`` (e.g. "restore of backup X into volume V")."""
    p = Pin(secrets.token_hex(12), tree, holder, host or socket.gethostname(), time.time())
    backend.put_doc(p.doc_name, json.dumps(asdict(p)).encode())
    return p


def unpin(backend: Backend, pin_id: str) -> None:
    """Remove a pin (nothing if it is gone already)."""
    with suppress(ObjectMissing):
        backend.delete_doc(f"{PREFIX}{pin_id}.json")


def list_pins(backend: Backend) -> list[Pin]:
    """Every pin in the store; a malformed pin document raises StoreError naming it."""
    out = []
    for name in backend.list_docs(PREFIX):
        if not name.endswith(".json"):
            continue
        try:
            doc = json.loads(backend.get_doc(name))
            out.append(Pin(**{k: doc[k] for k in Pin.__dataclass_fields__}))
        except ObjectMissing:
            continue  # unpinned meanwhile
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"pin document {name} in {backend.url} is malformed ({exc!r}); remove it"
            ) from None
    return out


@contextmanager
def pinned(backend: Backend, tree: str, holder: str, host: str | None = None) -> Iterator[Pin]:
    """Hold a pin on ``tree`` for the duration of the ``with``."""
    p = pin(backend, tree, holder, host)
    try:
        yield p
    finally:
        unpin(backend, p.id)

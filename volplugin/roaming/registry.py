"""Roaming volumes' records in the shared store: one document per volume, changed only
conditionally.

A roaming volume's identity lives in the store, in the document ``roaming/<id>``
(``id``: the store's content ID of the volume's name, keyed in an encrypted repository,
so that object names reveal nothing): its name, options and creation time, its lease
(the holder host, since when, and the generation, which grows by one at every take)
and its head (the last backup a holder published). Every change is a conditional
replace of the version read (Backend.swap_doc: S3 If-Match, or If-None-Match to
create), so of two hosts acting on the same version exactly one wins. Each write bumps
``serial``, so that no two versions have the same bytes (nor the same ETag).

A holder's lease is live while the document is younger than ``ttl`` by the store's
clock (its Date against the document's LastModified); the holder rewrites it every
ttl/4 (volplugin.roaming.lease).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from layerfs.errors import CorruptObject, ObjectMissing, StoreError
from layerfs.store.backend import Backend
from volplugin.errors import VolpluginError

PREFIX = "roaming/"
FORMAT = 1


class DamagedRecord(VolpluginError):
    """A roaming record in the store cannot be read as one (tampered with, or foreign)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a volume's lease: the host id, since when (Unix time) and the generation."""

    host: str
    since: float
    generation: int


@dataclass(frozen=True)
class Head:
    """The backup a holder published as the volume's current contents."""

    backup: str
    time: float  # when the backup was taken (Unix time)
    host: str
    generation: int  # the lease generation it was published under


@dataclass(frozen=True)
class RoamingRecord:
    """One roaming volume as the store keeps it."""

    name: str
    options: dict[str, str]
    created: str
    ttl: float
    generation: int = 0
    holder: Holder | None = None
    head: Head | None = None
    serial: int = 0
    format: int = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> RoamingRecord:
        """Parse and check a record that must be volume ``name``'s (DamagedRecord if not)."""
        try:
            doc = json.loads(data)
            holder = doc.get("holder")
            head = doc.get("head")
            record = cls(
                name=str(doc["name"]),
                options={str(k): str(v) for k, v in dict(doc["options"]).items()},
                created=str(doc["created"]),
                ttl=float(doc["ttl"]),
                generation=int(doc["generation"]),
                holder=Holder(
                    str(holder["host"]), float(holder["since"]), int(holder["generation"])
                )
                if holder
                else None,
                head=Head(
                    str(head["backup"]),
                    float(head["time"]),
                    str(head["host"]),
                    int(head["generation"]),
                )
                if head
                else None,
                serial=int(doc["serial"]),
                format=int(doc["format"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DamagedRecord(
                f"the store's record of roaming volume {name!r} is damaged: {exc}"
            ) from None
        if record.format != FORMAT:
            raise DamagedRecord(
                f"the store's record of roaming volume {name!r} has format {record.format}; "
                f"this volplugin reads format {FORMAT}: upgrade it"
            )
        if record.name != name or not record.ttl > 0:
            raise DamagedRecord(
                f"the store's record of roaming volume {name!r} is damaged: it names "
                f"{record.name!r} with a lease period of {record.ttl}"
            )
        return record


@dataclass(frozen=True)
class Found:
    """A record as read: the version's tag and its age by the store's clock (seconds)."""

    record: RoamingRecord
    tag: str
    age: float

    @property
    def live_holder(self) -> Holder | None:
        """The holder, if its lease has not expired (by the store's clock)."""
        holder = self.record.holder
        return holder if holder is not None and self.age < self.record.ttl else None


@dataclass
class Registry:
    """The roaming records of one store (an open Backend)."""

    backend: Backend
    _names: dict[str, str] = field(default_factory=dict)

    def doc_name(self, name: str) -> str:
        doc = self._names.get(name)
        if doc is None:
            doc = PREFIX + self.backend.content_id(b"volplugin roaming volume\0" + name.encode())
            self._names[name] = doc
        return doc

    def get(self, name: str) -> Found | None:
        """Volume ``name``'s record, None if the store has none."""
        try:
            version = self.backend.get_doc_version(self.doc_name(name))
        except ObjectMissing:
            return None
        except CorruptObject as exc:
            raise DamagedRecord(f"the store's record of roaming volume {name!r}: {exc}") from None
        return Found(RoamingRecord.from_bytes(version.data, name), version.tag, version.age)

    def all(self) -> list[Found]:
        """Every roaming record of the store (damaged ones are skipped)."""
        out = []
        for doc in self.backend.list_docs(PREFIX):
            try:
                version = self.backend.get_doc_version(doc)
                data = json.loads(version.data)
                record = RoamingRecord.from_bytes(version.data, str(data.get("name")))
            except ObjectMissing:
                continue  # removed meanwhile
            except (StoreError, ValueError, AttributeError):
                continue
            if self.doc_name(record.name) == doc:
                out.append(Found(record, version.tag, version.age))
        return sorted(out, key=lambda f: f.record.name)

    def create(self, record: RoamingRecord) -> Found | None:
        """Write a new record; None if the volume has one already."""
        tag = self.backend.swap_doc(self.doc_name(record.name), record.to_bytes(), None)
        return None if tag is None else Found(record, tag, 0.0)

    def replace(self, found: Found, record: RoamingRecord) -> Found | None:
        """Replace the version ``found`` with ``record``; None if it changed meanwhile."""
        record = replace(record, serial=found.record.serial + 1)
        tag = self.backend.swap_doc(self.doc_name(record.name), record.to_bytes(), found.tag)
        return None if tag is None else Found(record, tag, 0.0)

    def delete(self, name: str) -> None:
        self.backend.delete_doc(self.doc_name(name))

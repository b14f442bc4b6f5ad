"""Pack files and pack indexes: the object formats of the S3 store.

Many blobs travel in one pack object so a backup makes few, large requests::

    pack  = b"LFSPACK1" | blob bytes ... | trailer | u64le(len(trailer)) | b"LFSPEND1"
    trailer = zstd(json {"version": 1, "blobs": [[digest, offset, length], ...]})

The trailer lets an index be rebuilt from the packs alone. An index object maps
the blobs of one or more packs to their places::

    index = zstd(json {"version": 1, "packs": {pack_id: [[digest, offset, length], ...]}})

Both are immutable once written; their names are random ids, so writers on
different hosts never collide.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

from layerfs.errors import StoreError

PACK_MAGIC = b"LFSPACK1"
PACK_END = b"LFSPEND1"
FOOTER_SIZE = 16
MAX_JSON = 1 << 31  # the most a trailer or an index may decode to (also when its frame says more)
_VERSION = 1


def new_id() -> str:
    """A random 128-bit id for a pack or an index."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class BlobPlace:
    """Where a blob's bytes are: pack id, byte offset in the pack, length."""

    pack: str
    offset: int
    length: int


@dataclass
class PackWriter:
    """A pack being filled in memory; ``seal`` finishes it and returns its bytes."""

    pack_id: str = field(default_factory=new_id)
    buf: bytearray = field(default_factory=lambda: bytearray(PACK_MAGIC))
    blobs: list[tuple[str, int, int]] = field(default_factory=list)
    uploaded: float = 0.0  # time.monotonic() when its upload ended (0: not uploaded)
    sealed: bool = False  # the trailer and footer are in ``buf``

    def add(self, digest: str, data: bytes) -> BlobPlace:
        assert not self.sealed, "a blob added to a sealed pack"
        offset = len(self.buf)
        self.buf += data
        self.blobs.append((digest, offset, len(data)))
        return BlobPlace(self.pack_id, offset, len(data))

    def read(self, place: BlobPlace) -> bytes | None:
        """A blob's bytes while the pack is in memory; None once ``release``d."""
        buf = self.buf
        end = place.offset + place.length
        return bytes(buf[place.offset : end]) if len(buf) >= end else None

    def release(self) -> None:
        """Drop the bytes (the pack is uploaded); the blob list stays for the index."""
        self.buf = bytearray()

    @property
    def size(self) -> int:
        return len(self.buf)

    def seal(self, protect: Callable[[bytes], bytes] = bytes) -> bytearray:
        """The pack's bytes; ``protect`` turns the trailer into what is stored (encryption).

        The trailer and footer are added to the buffer itself, the first time only (an
        upload tried again sends the same bytes), so a pack on its way out is in memory
        once, not twice; its blobs stay where they were for ``read``. Nothing may be
        added once it is sealed.
        """
        if not self.sealed:
            trailer = protect(_pack_json({"version": _VERSION, "blobs": self.blobs}))
            self.buf += trailer + struct.pack("<Q", len(trailer)) + PACK_END
            self.sealed = True
        return self.buf


def parse_footer(name: str, footer: bytes) -> int:
    """Length of the trailer a pack's last FOOTER_SIZE bytes announce."""
    if len(footer) != FOOTER_SIZE or footer[8:] != PACK_END:
        raise StoreError(f"pack {name} is damaged: its footer is wrong; run a check of the store")
    return struct.unpack("<Q", footer[:8])[0]


def parse_trailer(name: str, trailer: bytes) -> list[tuple[str, int, int]]:
    """The (digest, offset, length) list a pack trailer holds."""
    doc = _unpack_json(name, trailer)
    return [(str(d), int(o), int(n)) for d, o, n in doc["blobs"]]


def encode_index(packs: dict[str, list[tuple[str, int, int]]]) -> bytes:
    return _pack_json({"version": _VERSION, "packs": packs})


def decode_index(name: str, data: bytes) -> dict[str, list[tuple[str, int, int]]]:
    doc = _unpack_json(name, data)
    return {
        pack: [(str(d), int(o), int(n)) for d, o, n in blobs]
        for pack, blobs in doc["packs"].items()
    }


def _pack_json(doc: dict) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(json.dumps(doc).encode())


def _unpack_json(name: str, data: bytes) -> dict:
    try:
        declared = zstandard.frame_content_size(data)  # -1: not declared
        if declared > MAX_JSON:  # python-zstandard would allocate it, whatever max_output_size
            raise ValueError(f"its zstd frame declares {declared} bytes, more than {MAX_JSON}")
        doc = json.loads(zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_JSON))
    except (ValueError, zstandard.ZstdError) as exc:
        raise StoreError(f"{name} is damaged: cannot decode it ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("version") != _VERSION:
        raise StoreError(f"{name} has an unknown format version; upgrade layerfs")
    return doc

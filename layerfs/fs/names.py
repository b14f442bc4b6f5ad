"""A codec name for fusepy: UTF-8 that keeps non-UTF-8 bytes as surrogate escapes.

fusepy decodes and encodes every path and name with one codec name and strict
errors; registering this codec lets names that are not valid UTF-8 pass through
unchanged, the same way layerfs records keep them.
"""

from __future__ import annotations

import codecs

FS_ENCODING = "layerfs-fsname"


def _encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
    return codecs.utf_8_encode(text, "surrogateescape")


def _decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
    return codecs.utf_8_decode(data, "surrogateescape", True)


def _search(name: str) -> codecs.CodecInfo | None:
    if name.replace("_", "-") != FS_ENCODING:
        return None
    return codecs.CodecInfo(_encode, _decode, name=FS_ENCODING)


def register_fs_encoding() -> str:
    """Make FS_ENCODING known to the codec registry (idempotent); return its name."""
    try:
        codecs.lookup(FS_ENCODING)
    except LookupError:
        codecs.register(_search)
    return FS_ENCODING

"""Damage, lose or age one stored blob of a local store, as a disk fault, a prune or time would."""

from __future__ import annotations

import os
import time
from pathlib import Path


def blob_file(backend, digest: str) -> tuple[Path, int, int]:
    """(pack file, offset, length) of a durable blob of a local store."""
    rel, offset, length = backend.blob_location(digest)
    return backend.object_path(rel), offset, length


def corrupt_blob(backend, digest: str, at: int | None = None, xor: int = 0xFF) -> None:
    """Flip bits of one byte of the blob's stored bytes (its middle, or index ``at``)."""
    path, offset, length = blob_file(backend, digest)
    pos = offset + (length // 2 if at is None else at % length)
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ xor]))


def lose_blob(backend, digest: str) -> None:
    """Remove just this blob from the store (the store repacks its pack without it)."""
    backend.delete_blobs([digest])


def age_blob(backend, digest: str, seconds: float) -> None:
    """Make the pack holding the blob look written ``seconds`` ago."""
    path, _, _ = blob_file(backend, digest)
    then = time.time() - seconds
    os.utime(path, (then, then))

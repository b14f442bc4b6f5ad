"""Bulk one-pass reads from pack files: wanted blobs grouped into few large range GETs.

A restore needs most blobs of the packs it touches, each once. ``plan_ranges``
groups the wanted blobs by pack into ranges of at most ``RANGE_MAX`` bytes that
may span up to ``RANGE_GAP`` unwanted bytes between two wanted blobs, ordered by
when the caller first asked for one of their blobs (so files tend to complete in
the caller's order). The packed store fetches such ranges a few ahead of the
caller on a thread pool (``layerfs.store.ordered``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from layerfs.store.packs import BlobPlace

RANGE_MAX = 8 << 20
RANGE_GAP = 256 << 10


@dataclass(frozen=True, slots=True)
class PackRange:
    """One range GET: bytes [start, end) of a pack and the wanted blobs inside it."""

    pack: str
    start: int
    end: int
    blobs: tuple[tuple[str, int, int], ...]  # (digest, offset in the pack, length)


def plan_ranges(
    order: Sequence[str],
    places: dict[str, BlobPlace],
    range_max: int = RANGE_MAX,
    gap: int = RANGE_GAP,
) -> list[PackRange]:
    """Ranges covering the blobs of ``places``, ranked by their blobs' first position in
    ``order`` (which lists every digest of ``places``)."""
    rank = {digest: i for i, digest in enumerate(order)}
    by_pack: dict[str, list[tuple[int, int, str]]] = {}
    for digest, place in places.items():
        by_pack.setdefault(place.pack, []).append((place.offset, place.length, digest))
    ranked: list[tuple[int, PackRange]] = []
    for pack, blobs in by_pack.items():
        blobs.sort()
        current: list[tuple[str, int, int]] = []
        start = end = first = 0
        for offset, length, digest in blobs:
            if current and (offset - end > gap or offset + length - start > range_max):
                ranked.append((first, PackRange(pack, start, end, tuple(current))))
                current = []
            if not current:
                start, first = offset, rank[digest]
            current.append((digest, offset, length))
            end = offset + length
            first = min(first, rank[digest])
        if current:
            ranked.append((first, PackRange(pack, start, end, tuple(current))))
    ranked.sort(key=lambda item: item[0])
    return [r for _, r in ranked]

"""Unit tests of the S3 store's parts that need no server: pack format, blob cache, URLs."""

from __future__ import annotations

import os
import struct
import time

import pytest

from layerfs.errors import StoreError
from layerfs.store import packs
from layerfs.store.cache import BlobCache
from layerfs.store.s3 import S3Backend


def test_pack_trailer_lists_every_blob() -> None:
    writer = packs.PackWriter()
    places = [writer.add(f"{i:032x}", os.urandom(100 + i)) for i in range(5)]
    sealed = writer.seal()
    assert sealed.startswith(packs.PACK_MAGIC)
    size = packs.parse_footer("p", sealed[-packs.FOOTER_SIZE :])
    trailer = sealed[-packs.FOOTER_SIZE - size : -packs.FOOTER_SIZE]
    entries = packs.parse_trailer("p", trailer)
    assert entries == [(f"{i:032x}", p.offset, p.length) for i, p in enumerate(places)]
    for place in places:
        assert writer.read(place) == sealed[place.offset : place.offset + place.length]
    again = bytes(sealed)
    assert writer.seal() is sealed and sealed == again  # in place, once: a retry sends the same
    writer.release()
    assert writer.read(places[0]) is None


def test_damaged_footer_and_index_are_store_errors() -> None:
    with pytest.raises(StoreError, match="pack px is damaged"):
        packs.parse_footer("pack px", struct.pack("<Q", 5) + b"NOTAPACK")
    with pytest.raises(StoreError, match="index i1 is damaged"):
        packs.decode_index("index i1", b"garbage")
    doc = {"a" * 32: [("b" * 32, 8, 10)]}
    assert packs.decode_index("i", packs.encode_index(doc)) == doc


def test_cache_is_bounded_and_drops_damaged_entries(tmp_path) -> None:
    cache = BlobCache(tmp_path, limit=40_000)
    for i in range(10):
        cache.put(f"{i:032x}", bytes([i]) * 5000)
        time.sleep(0.01)  # distinct mtimes for the LRU order
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size <= 40_000
    assert cache.get(f"{9:032x}") == bytes([9]) * 5000
    assert cache.get(f"{0:032x}") is None  # the oldest went first
    path = tmp_path / "00" / f"{9:032x}"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    assert cache.get(f"{9:032x}") is None
    assert not path.exists()


def test_bad_urls_and_buckets(tmp_path) -> None:
    with pytest.raises(StoreError, match="s3://BUCKET/PREFIX"):
        S3Backend.from_url("s3:///nobucket", cache_root=tmp_path)
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        S3Backend("Bad_Bucket", cache_root=tmp_path)

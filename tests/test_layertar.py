"""Layer tars to entries: every entry kind, exact metadata, digests, compression, unsafe paths."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from layerfs.errors import ImportRejected
from layerfs.formats.layertar import INLINE_MAX, parse_layer
from layerfs.formats.links import LinkChecker
from layerfs.formats.paths import BadPath, normalize
from layerfs.records import Entry, Kind, read_content
from layerfs.store import open_store
from layerfs.store.chunks import ChunkStore

CAP = bytes.fromhex("0100000200040000000000000000000000000000")
BAD_NAME = b"caf\xe9".decode("utf-8", "surrogateescape")
LONG = "x" * 255


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1700000000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return open_store(str(tmp_path / "store"))


def _by_path(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


BIG = os.urandom(300_000)


def feature_tar() -> bytes:
    frac = _info("dir/frac", mode=0o640)
    frac.pax_headers = {"mtime": "1700000000.123456789"}
    cap = _info("dir/cap", mode=0o755)
    cap.pax_headers = {"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape")}
    return make_tar(
        [
            (_info("./", tarfile.DIRTYPE, mode=0o755), None),
            (_info("./dir/", tarfile.DIRTYPE, mode=0o1777, uid=1000, gid=2000), None),
            (frac, b"fraction"),
            (cap, b"cap"),
            (_info("dir/suid", mode=0o4755), b"s"),
            (_info("dir/sgid", mode=0o2755), b"g"),
            (_info("dir/empty"), b""),
            (_info("dir/edge", mode=0o644), b"e" * INLINE_MAX),
            (_info("dir/big"), BIG),
            (_info("dir/big2"), BIG),
            (_info("dir/link", tarfile.LNKTYPE, linkname="./dir/big"), None),
            (_info("dir/sym", tarfile.SYMTYPE, linkname="../etc/../nowhere"), None),
            (_info("dir/chr", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
            (_info("dir/blk", tarfile.BLKTYPE, devmajor=8, devminor=1), None),
            (_info("dir/fifo", tarfile.FIFOTYPE), None),
            (_info(f"dir/{BAD_NAME}"), b"latin1"),
            (_info(f"dir/{LONG}"), b"long"),
            (_info("dir/.wh.gone"), b""),
            (_info("opq/.wh..wh..opq"), b""),
            (_info("dir/.wh..wh.plnk"), b""),
        ]
    )


def test_every_entry_kind_and_attribute(store: ChunkStore) -> None:
    data = feature_tar()
    layer = parse_layer(store, io.BytesIO(data), "layer 1")
    store.flush()
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest() == layer.blob_digest
    assert layer.compression == "none"
    e = _by_path(layer.entries)
    assert [x.path for x in layer.entries][:2] == ["", "dir"]
    assert e["dir"].kind is Kind.DIR and e["dir"].mode == 0o1777
    assert (e["dir"].uid, e["dir"].gid) == (1000, 2000)
    assert e["dir/frac"].mtime_ns == 1700000000123456789 and e["dir/frac"].mode == 0o640
    assert e["dir/cap"].xattrs == {"security.capability": CAP}
    assert e["dir/suid"].mode == 0o4755 and e["dir/sgid"].mode == 0o2755
    assert e["dir/empty"].inline == b"" and e["dir/empty"].size == 0
    assert e["dir/edge"].inline == b"e" * INLINE_MAX and not e["dir/edge"].chunks
    big = e["dir/big"]
    assert big.inline is None and big.size == len(BIG) and read_content(store, big) == BIG
    assert e["dir/big2"].chunks == big.chunks  # same content, same chunks
    assert e["dir/link"].kind is Kind.HARDLINK and e["dir/link"].target == "dir/big"
    assert e["dir/sym"].kind is Kind.SYMLINK and e["dir/sym"].target == "../etc/../nowhere"
    assert e["dir/chr"].kind is Kind.CHAR and e["dir/chr"].rdev == (1, 3)
    assert e["dir/blk"].kind is Kind.BLOCK and e["dir/blk"].rdev == (8, 1)
    assert e["dir/fifo"].kind is Kind.FIFO
    assert read_content(store, e[f"dir/{BAD_NAME}"]) == b"latin1"
    assert e[f"dir/{LONG}"].inline == b"long"
    assert e["dir/gone"].kind is Kind.WHITEOUT
    assert e["opq"].kind is Kind.OPAQUE
    assert not any(".wh." in p for p in e)
    assert layer.apparent_size == sum(x.size for x in layer.entries if x.kind is Kind.FILE)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers_have_the_same_diff_id(store: ChunkStore, compression: str) -> None:
    data = feature_tar()
    if compression == "gzip":
        packed = gzip.compress(data)
    else:
        packed = zstandard.ZstdCompressor().compress(data)
    layer = parse_layer(store, io.BytesIO(packed), "layer 1")
    plain = parse_layer(store, io.BytesIO(data), "layer 1")
    assert layer.compression == compression
    assert layer.diff_id == plain.diff_id
    assert layer.blob_digest == "sha256:" + hashlib.sha256(packed).hexdigest()
    assert [x.to_json() for x in layer.entries] == [x.to_json() for x in plain.entries]


def test_truncated_compressed_layer_names_layer_and_entry(store: ChunkStore) -> None:
    packed = gzip.compress(make_tar([(_info("a"), b"x" * 10), (_info("b"), os.urandom(200_000))]))
    with pytest.raises(ImportRejected, match=r"layer 7: .*truncated.*'b'"):
        parse_layer(store, io.BytesIO(packed[: len(packed) // 2]), "layer 7")


def test_garbage_is_refused(store: ChunkStore) -> None:
    with pytest.raises(ImportRejected, match="layer 2: .*not a valid tar"):
        parse_layer(store, io.BytesIO(os.urandom(5000)), "layer 2")


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil", "a/./../../b", "x" * 256])
def test_unsafe_entry_names_are_refused(store: ChunkStore, name: str) -> None:
    data = make_tar([(_info("ok"), b"1"), (_info(name), b"2")])
    with pytest.raises(ImportRejected, match="layer 3: entry .*" + name[:20]):
        parse_layer(store, io.BytesIO(data), "layer 3")


def test_unsafe_hardlink_target_is_refused(store: ChunkStore) -> None:
    data = make_tar([(_info("a", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)])
    with pytest.raises(ImportRejected, match="layer 1: entry 'a': hardlink target"):
        parse_layer(store, io.BytesIO(data), "layer 1")


def test_normalize() -> None:
    assert normalize("./a/b/") == "a/b"
    assert normalize("a//./b") == "a/b"
    assert normalize("./") == normalize("/") == normalize(".") == ""
    for bad in ("../a", "/a", "a/..", "/../a"):
        with pytest.raises(BadPath):
            normalize(bad)


def _entries(*specs: tuple[str, Kind, str]) -> list[Entry]:
    return [Entry(path, kind, target=target) for path, kind, target in specs]


def test_hardlinks_resolve_in_this_or_lower_layers() -> None:
    links = LinkChecker()
    links.add_layer(
        _entries(("d", Kind.DIR, ""), ("d/f", Kind.FILE, ""), ("d/l", Kind.HARDLINK, "d/f")), "l1"
    )
    links.add_layer(_entries(("d/up", Kind.HARDLINK, "d/f")), "l2")  # to a lower layer
    links.add_layer(_entries(("d/f", Kind.WHITEOUT, "")), "l3")
    with pytest.raises(ImportRejected, match="l4: entry 'x': hardlink to 'd/f'"):
        links.add_layer(_entries(("x", Kind.HARDLINK, "d/f")), "l4")
    links.add_layer(_entries(("x", Kind.HARDLINK, "d/up")), "l4")  # the other link survives
    links.add_layer(_entries(("d", Kind.OPAQUE, ""), ("d/new", Kind.FILE, "")), "l5")
    with pytest.raises(ImportRejected, match="l6: entry 'y'"):
        links.add_layer(_entries(("y", Kind.HARDLINK, "d/up")), "l6")
    with pytest.raises(ImportRejected, match="hardlink to the directory 'd'"):
        links.add_layer(_entries(("z", Kind.HARDLINK, "d")), "l6")
    with pytest.raises(ImportRejected, match="neither earlier"):
        links.add_layer(_entries(("w", Kind.HARDLINK, "later"), ("later", Kind.FILE, "")), "l6")

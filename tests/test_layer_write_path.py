"""The read-and-hash path of layer tars: fast ustar headers, ordered blob reads, the
hashing thread, and the errors each of them passes on."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from layerfs.errors import CorruptObject, ObjectMissing
from layerfs.layertar import BLOCK, tar_header, tar_info, write_layer
from layerfs.records import Entry, Kind
from layerfs.store.backend import Backend
from layerfs.store.chunks import ChunkRef, ChunkStore
from layerfs.store.location import open_store
from tests.support.blobs import lose_blob

BAD_NAME = b"caf\xe9".decode("utf-8", "surrogateescape")


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return open_store(str(tmp_path / "store"))


def _reference_header(entry: Entry) -> bytes | None:
    info = tar_info(entry)
    return None if info is None else info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _header_cases() -> list[Entry]:
    second = 1_000_000_000
    cases = [
        Entry("", Kind.DIR, 0o755),
        Entry("etc", Kind.DIR, 0o1777, 1000, 2000, 1_700_000_000 * second),
        Entry("etc/", Kind.DIR, 0o755),
        Entry("etc/passwd", Kind.FILE, 0o4755, 0, 0, 1_700_000_000_123_456_789, 1234),
        Entry("etc/link", Kind.HARDLINK, 0o644, target="etc/passwd", size=1234),
        Entry("etc/sym", Kind.SYMLINK, 0o777, target="../x/" + "y" * 95),
        Entry("etc/long-sym", Kind.SYMLINK, 0o777, target="t" * 101),
        Entry("dev/null", Kind.CHAR, 0o666, rdev=(1, 3)),
        Entry("dev/sda", Kind.BLOCK, 0o660, rdev=(8, 8**7 - 1)),
        Entry("dev/big", Kind.BLOCK, 0o660, rdev=(8**7, 0)),
        Entry("run/fifo", Kind.FIFO, 0o600),
        Entry("run/sock", Kind.SOCKET, 0o600),
        Entry("gone", Kind.WHITEOUT),
        Entry("dir/gone", Kind.WHITEOUT),
        Entry("dir", Kind.OPAQUE),
        Entry("x" * 100, Kind.FILE, size=1),
        Entry("x" * 101, Kind.FILE, size=1),
        Entry("d" * 99, Kind.DIR),
        Entry("d" * 100, Kind.DIR),
        Entry(f"latin/{BAD_NAME}", Kind.FILE, size=6),
        Entry("utf/é", Kind.FILE, size=2),
        Entry("caps", Kind.FILE, 0o755, size=3, xattrs={"security.capability": b"\x01\x00"}),
        Entry("ids/max", Kind.FILE, uid=8**7 - 1, gid=8**7 - 1),
        Entry("ids/over", Kind.FILE, uid=8**7, gid=1),
        Entry("size/max", Kind.FILE, size=8**11 - 1),
        Entry("size/over", Kind.FILE, size=8**11),
        Entry("time/zero", Kind.FILE, mtime_ns=0),
        Entry("time/before-1970", Kind.FILE, mtime_ns=-5 * second),
        Entry("time/max", Kind.FILE, mtime_ns=(8**11 - 1) * second),
        Entry("time/over", Kind.FILE, mtime_ns=8**11 * second),
        Entry("w" * 97, Kind.WHITEOUT),  # ".wh." makes it 101 long
    ]
    rng = random.Random(5)
    for i in range(300):
        kind = rng.choice([Kind.FILE, Kind.DIR, Kind.SYMLINK, Kind.HARDLINK, Kind.FIFO])
        name = "/".join("".join(rng.choices("abc-_.09", k=rng.randint(1, 30))) for _ in range(3))
        cases.append(
            Entry(
                f"r{i}/{name}",
                kind,
                rng.randint(0, 0o7777),
                rng.choice([0, 1, 65534, rng.randint(0, 8**7)]),
                rng.choice([0, 50, rng.randint(0, 8**7)]),
                rng.randint(0, 2_000_000_000) * 1_000_000_000 + rng.randint(0, 999_999_999),
                rng.randint(0, 1 << 34) if kind is Kind.FILE else 0,
                target=name[::-1] if kind in (Kind.SYMLINK, Kind.HARDLINK) else "",
            )
        )
    return cases


@pytest.mark.parametrize("entry", _header_cases(), ids=lambda e: f"{e.kind.name}:{e.path[:40]}")
def test_tar_header_is_what_tarfile_writes(entry: Entry) -> None:
    try:
        expected = _reference_header(entry)
    except ValueError as exc:  # a number no tar field can hold: both refuse it
        with pytest.raises(ValueError, match=str(exc)):
            tar_header(entry)
        return
    assert tar_header(entry) == expected


def _file(store: ChunkStore, path: str, data: bytes) -> Entry:
    entry = Entry(path, Kind.FILE, 0o644, mtime_ns=1_700_000_000 * 1_000_000_000, size=len(data))
    entry.chunks = store.write_bytes(data)
    return entry


def _expected_tar(entries: list[Entry], contents: dict[str, bytes]) -> bytes:
    """The layer tar as tarfile headers, content and padding (the writer's contract)."""
    out = io.BytesIO()
    for entry in entries:
        header = _reference_header(entry)
        if header is None:
            continue
        out.write(header)
        data = contents.get(entry.path, b"") if entry.kind is Kind.FILE else b""
        out.write(data + bytes(-len(data) % BLOCK))
    out.write(bytes(2 * BLOCK))
    return out.getvalue()


def test_layer_bytes_from_durable_pending_and_inline_content(store: ChunkStore) -> None:
    rng = random.Random(3)
    contents = {
        "a/big": rng.randbytes(3 << 20),  # many chunks
        "a/compressible": b"layer " * 200_000,
        "a/odd": rng.randbytes(70_001),
        "b/same": b"",
    }
    contents["b/same"] = contents["a/odd"]  # the same chunks twice in the tar
    entries = [Entry("a", Kind.DIR, 0o755), Entry("a/gone", Kind.WHITEOUT)]
    entries += [_file(store, p, contents[p]) for p in ("a/big", "a/compressible")]
    store.flush()  # these are durable, the next ones still pending in tmp/
    entries += [_file(store, "a/odd", contents["a/odd"]), Entry("b", Kind.DIR, 0o700)]
    entries.append(_file(store, "b/same", contents["b/same"]))
    small = Entry("b/small", Kind.FILE, 0o600, size=5, inline=b"small")
    contents["b/small"] = b"small"
    entries += [small, Entry("b/empty", Kind.FILE, size=0, inline=b""), Entry("b", Kind.OPAQUE)]
    expected = _expected_tar(entries, contents)

    sink = io.BytesIO()
    digest = write_layer(entries, store, sink)
    assert sink.getvalue() == expected
    assert digest.diff_id == "sha256:" + hashlib.sha256(expected).hexdigest()
    assert digest.size == len(expected)
    with tarfile.open(fileobj=io.BytesIO(expected)) as tar:
        assert tar.extractfile("a/big").read() == contents["a/big"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_missing_chunk_is_named_and_nothing_stays_open(store: ChunkStore) -> None:
    entries = [_file(store, f"f{i}", os.urandom(50_000)) for i in range(100)]
    store.flush()
    lost = entries[60].chunks[0].digest
    lose_blob(store.backend, lost)
    before = _open_fds()
    with pytest.raises(ObjectMissing, match=lost):
        write_layer(entries, store)
    assert _open_fds() == before


def test_wrong_record_size_is_refused(store: ChunkStore) -> None:
    entry = _file(store, "f", b"12345")
    entry.size = 6
    with pytest.raises(Exception, match="the store holds 5 bytes but the record says 6"):
        write_layer([entry], store)


class _FullDisk(io.RawIOBase):
    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)


def test_sink_error_reaches_the_caller(store: ChunkStore) -> None:
    entries = [_file(store, f"f{i}", os.urandom(200_000)) for i in range(40)]
    with pytest.raises(OSError, match="No space left"):
        write_layer(entries, store, _FullDisk(3 << 20))


def _blobs(store: ChunkStore, count: int) -> list[ChunkRef]:
    return [store.put_chunk(os.urandom(1000 + i)) for i in range(count)]


@pytest.mark.parametrize("reader", ["local", "generic"])
def test_blobs_come_in_order_and_early_stop_closes_them(store: ChunkStore, reader: str) -> None:
    backend = store.backend
    refs = _blobs(store, 150)
    store.flush()
    refs += _blobs(store, 50)  # pending
    order = refs + refs[::7]  # repeats too
    read = backend.read_blobs_in_order if reader == "local" else _generic(backend)
    blobs = list(read(r.digest for r in order))
    got = [store.decode(r.digest, b) for r, b in zip(order, blobs, strict=True)]
    assert got == [store.get_chunk(r.digest) for r in order]

    before = _open_fds()
    partial = read(r.digest for r in order)
    assert next(partial)
    partial.close()
    assert _open_fds() == before


def test_blobs_that_follow_each_other_in_a_pack_come_with_one_read(store: ChunkStore) -> None:
    backend = store.backend
    refs = _blobs(store, 150)  # about 160 KB, written one after the other
    store.flush()
    reads: list[tuple[int, int]] = []
    real_get = backend.objects.get

    def counting_get(rel, label, start=0, end=None):  # noqa: ANN001, ANN202
        reads.append((start, end))
        return real_get(rel, label, start, end)

    backend.objects.get = counting_get
    blobs = list(backend.read_blobs_in_order(r.digest for r in refs))
    assert len(reads) == 1
    assert [store.decode(r.digest, b) for r, b in zip(refs, blobs, strict=True)] == [
        store.get_chunk(r.digest) for r in refs
    ]


def test_a_blob_lost_from_a_range_fails_at_its_turn(store: ChunkStore) -> None:
    """The range read comes back short (the pack was repacked without the blob): the
    blobs are read one by one, each where the indexes now say, and the lost one raises
    when its turn comes, naming it."""
    refs = _blobs(store, 40)
    store.flush()
    lost = refs[17].digest
    lose_blob(store.backend, lost)
    got = store.backend.read_blobs_in_order(r.digest for r in refs)
    for ref in refs[:17]:
        assert store.decode(ref.digest, next(got)) == store.get_chunk(ref.digest)
    with pytest.raises(ObjectMissing, match=lost):
        next(got)
    got.close()


def _generic(backend: Backend):
    return lambda digests: Backend.read_blobs_in_order(backend, digests)


def test_stream_content_checks_sizes(store: ChunkStore) -> None:
    ref = store.put_chunk(b"x" * 5000)
    wrong = ChunkRef(ref.digest, 4999)
    # the chunk's zstd frame declares its real size, which is refused before decoding
    with pytest.raises(CorruptObject, match="declares 5000 bytes, more than 4999"):
        list(store.stream_content([ref, wrong]))

"""An S3 backup store is an encrypted, authenticated repository, through the real CLI and RGW.

A volume whose names and contents carry markers is backed up twice with
`volplugin backup`; no object in the bucket shows a marker in its key or its
bytes (nor in any zstd frame found in them). Then objects are tampered with
boto3 (a byte flipped in a pack, an index, a tree record or a backup document;
two packs swapped; an index replaced by an older one): `volplugin restore`,
`backups` and `verify --read-data` fail naming the object, and a restore never
leaves wrong bytes under a file's name. The reading commands use a fresh local
cache, as another host would, so they see what is in the bucket.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from layerfs.records import get_tree
from layerfs.store import packs
from layerfs.store.location import open_backend, open_store
from tests.support.s3backup import S3Store, backup, cli, fill_random, store_fixture

pytestmark = pytest.mark.s3

MARKER = b"SECRET-MARKER-7f3a"
VOLUME = "vault-of-eve-c41d"
NAMES = ("passwords-of-alice.txt", "ledger-of-carol", "letters-to-dave.txt", "diary-of-bob")
NEEDLES = (MARKER, VOLUME.encode(), *(n.encode() for n in NAMES))
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

store = store_fixture("repo-enc")


@dataclass
class Backups:
    """Two backups of one volume, the files of each, and the bucket keys each added."""

    store: S3Store
    first: dict
    second: dict
    files: list[dict[str, bytes]]  # relative path -> content, per backup
    new_keys: list[set[str]]  # keys under the store prefix each backup added
    env: dict[str, str]  # for reading commands: a fresh local cache, as on another host


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def backups(store: S3Store, tmp_path: Path) -> Backups:
    vol = tmp_path / VOLUME
    (vol / "diary-of-bob").mkdir(parents=True)
    (vol / "passwords-of-alice.txt").write_bytes(b"alice: " + MARKER + b"\n")
    (vol / "letters-to-dave.txt").write_bytes(b"Dear Dave, " + MARKER + b"\n" * 50_000)
    fill_random(vol, 1, 3 << 20, seed=71, name="ledger-of-carol")
    data = bytearray((vol / "ledger-of-carol000").read_bytes())
    data[1 << 20 : (1 << 20) + len(MARKER)] = MARKER  # inside a chunk of random bytes
    (vol / "ledger-of-carol000").write_bytes(bytes(data))
    (vol / "diary-of-bob" / "day-1.txt").write_bytes(MARKER * 1000)
    files, new_keys, records = [], [], []
    for _ in range(2):
        before = set(store.keys())
        records.append(backup(store, VOLUME, vol))
        files.append(_snapshot(vol))
        new_keys.append(set(store.keys()) - before)
        with (vol / "letters-to-dave.txt").open("ab") as f:  # a change for the second backup
            f.write(b"P.S. " + MARKER * 20_000)
        (vol / "diary-of-bob" / "day-2.txt").write_bytes(b"bob " + MARKER)
    assert records[1]["parent"] == records[0]["id"]
    env = {"LAYERFS_CACHE_DIR": str(tmp_path / "other-host-cache")}
    return Backups(store, records[0], records[1], files, new_keys, env)


def _objects(store: S3Store) -> dict[str, bytes]:
    """Every object in the bucket (whatever its prefix): key -> body."""
    client = store.env.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=store.bucket, Key=k)["Body"].read() for k in keys}


def _zstd_frames(body: bytes) -> list[bytes]:
    """The output of every zstd frame that starts somewhere in ``body`` and decodes."""
    out, start = [], body.find(ZSTD_MAGIC)
    while start >= 0:
        with contextlib.suppress(zstandard.ZstdError):
            out.append(zstandard.ZstdDecompressor().decompressobj().decompress(body[start:]))
        start = body.find(ZSTD_MAGIC, start + 1)
    return out


def test_nothing_readable_in_the_bucket(backups: Backups) -> None:
    objects = _objects(backups.store)
    assert any(k.startswith("store/packs/") for k in objects), sorted(objects)
    assert any(k.startswith("store/docs/backups/") for k in objects), sorted(objects)
    for key, body in objects.items():
        for text in (body, *_zstd_frames(body)):
            for needle in NEEDLES:
                assert needle not in key.encode(), f"{needle!r} in the key {key}"
                assert needle not in text, f"{needle!r} in the object {key}"
    config = json.loads(objects["store/docs/config"])
    assert config["encryption"] == "aes-256-gcm" and config["format"] == "layerfs-repository"
    # the markers are there to find: the same search sees them in a plain zstd frame
    assert MARKER in _zstd_frames(b"junk" + zstandard.compress(MARKER * 3))[0]


# -- tampering ------------------------------------------------------------------------------------


def _get(b: Backups, rel: str) -> bytes:
    return b.store.env.client().get_object(Bucket=b.store.bucket, Key=f"store/{rel}")["Body"].read()


def _put(b: Backups, rel: str, data: bytes) -> None:
    b.store.env.client().put_object(Bucket=b.store.bucket, Key=f"store/{rel}", Body=data)


def _flip(b: Backups, rel: str, at: int) -> None:
    data = bytearray(_get(b, rel))
    data[at] ^= 0x40
    _put(b, rel, bytes(data))


def _indexes(b: Backups) -> dict[str, dict[str, list[tuple[str, int, int]]]]:
    """index id -> its packs and their blobs, opened with the repository's key."""
    backend = open_backend(b.store.url)
    try:
        out = {}
        for rel in b.store.keys("index/"):
            index_id = rel.split("/", 1)[1]
            plain = backend.inner.sealer.open("index", index_id, _get(b, rel))
            out[index_id] = packs.decode_index(rel, plain)
        return out
    finally:
        backend.close()


def _place(b: Backups, digest: str) -> tuple[str, str, int, int]:
    """(index id, pack key, offset, length) of a blob."""
    for index_id, doc in _indexes(b).items():
        for pack_id, blobs in doc.items():
            for d, offset, length in blobs:
                if d == digest:
                    return index_id, f"packs/{pack_id[:2]}/{pack_id}", offset, length
    raise AssertionError(f"no index names {digest}")


def _chunks(b: Backups, record: dict, path: str) -> list[str]:
    entries, _ = get_tree(open_store(b.store.url), record["tree"])
    return [c.digest for c in next(e for e in entries if e.path == path).chunks]


def _run(b: Backups, *args: str) -> tuple[int, str]:
    """Run a reading command as another host; (exit status, stdout + stderr)."""
    proc = cli(*args, store=b.store.url, env=b.env, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _restore(b: Backups, which: int, out: Path) -> tuple[int, str]:
    """Restore a backup to ``out``; every file there must hold exactly its original bytes."""
    record = (b.first, b.second)[which]
    status, text = _run(b, "restore", record["id"], "--to-dir", str(out))
    originals = b.files[which]
    for p in out.rglob("*") if out.exists() else ():
        rel = str(p.relative_to(out))
        assert not p.name.startswith(".bk-restore-"), f"left over: {rel}"
        if p.is_file():
            assert p.read_bytes() == originals[rel], f"wrong bytes restored under {rel}"
    return status, text


def _fails_naming(status_text: tuple[int, str], *names: str) -> None:
    status, text = status_text
    assert status != 0, text
    assert any(n in text for n in names), f"none of {names} in:\n{text}"


def _restores_whole(b: Backups, which: int, out: Path) -> None:
    status, text = _restore(b, which, out)
    assert status == 0, text
    assert _snapshot(out) == b.files[which]


def _lists_both(b: Backups) -> None:
    status, text = _run(b, "backups")
    assert status == 0 and b.first["id"][:12] in text and b.second["id"][:12] in text, text


def test_flipped_byte_in_a_pack(backups: Backups, tmp_path: Path) -> None:
    b = backups
    digest = _chunks(b, b.second, "ledger-of-carol000")[1]
    _, key, offset, length = _place(b, digest)
    _flip(b, key, offset + length // 2)

    _lists_both(b)
    status, text = _run(b, "verify", "--read-data")
    _fails_naming((status, text), f"damaged object {digest}")
    assert "authentication failed" in text and "  ledger-of-carol000" in text.splitlines()
    for which in (0, 1):  # the chunk is in both backups: the file is skipped, the rest restored
        out = tmp_path / f"out{which}"
        status, text = _restore(b, which, out)
        _fails_naming((status, text), f"ledger-of-carol000 (object blob {digest}")
        assert sorted(_snapshot(out)) == sorted(set(b.files[which]) - {"ledger-of-carol000"})


def test_flipped_byte_in_an_index(backups: Backups, tmp_path: Path) -> None:
    b = backups
    index_id, _, _, _ = _place(b, _chunks(b, b.second, "ledger-of-carol000")[1])
    _flip(b, f"index/{index_id}", 40)

    _lists_both(b)  # backup documents need no index
    _fails_naming(_run(b, "verify", "--read-data"), f"object index {index_id}: authentication")
    for which in (0, 1):
        status, text = _restore(b, which, tmp_path / f"out{which}")
        _fails_naming((status, text), f"object index {index_id}: authentication")


def test_flipped_byte_in_a_tree_record(backups: Backups, tmp_path: Path) -> None:
    b = backups
    tree = b.second["tree"]
    _, key, offset, length = _place(b, tree)
    _flip(b, key, offset + length // 2)

    _lists_both(b)
    status, text = _run(b, "verify", "--read-data")
    _fails_naming((status, text), f"damaged object {tree}")
    assert f"backup {b.second['id']} (volume {VOLUME}): 1 damaged path(s)\n  (tree record)" in text
    assert b.first["id"] not in text
    _fails_naming(_restore(b, 1, tmp_path / "out1"), f"object blob {tree}: authentication")
    _restores_whole(b, 0, tmp_path / "out0")


def test_flipped_byte_in_a_backup_document(backups: Backups, tmp_path: Path) -> None:
    b = backups
    (key,) = [k for k in b.new_keys[1] if k.startswith("docs/backups/")]
    assert b.second["id"] not in key
    _flip(b, key, 30)

    doc = f"object doc backups/{b.second['id']}.json: authentication failed"
    _fails_naming(_run(b, "backups"), doc)
    _fails_naming(_run(b, "verify", "--read-data"), doc)
    _fails_naming(_restore(b, 1, tmp_path / "out1"), doc)
    _restores_whole(b, 0, tmp_path / "out0")


def test_two_packs_swapped(backups: Backups, tmp_path: Path) -> None:
    b = backups
    # each backup wrote a pack of file data and a pack of tree records: swap the data packs
    first, second = (
        max((k for k in keys if k.startswith("packs/")), key=lambda k: len(_get(b, k)))
        for keys in b.new_keys[:2]
    )
    blobs = {d for doc in _indexes(b).values() for blobs in doc.values() for d, _, _ in blobs}
    data_first, data_second = _get(b, first), _get(b, second)
    _put(b, first, data_second)
    _put(b, second, data_first)

    _lists_both(b)
    # each error names a blob of the swapped packs (and the pack when its range is not there)
    named = [first, second, *blobs]
    _fails_naming(_run(b, "verify", "--read-data"), *named)
    for which in (0, 1):
        _fails_naming(_restore(b, which, tmp_path / f"out{which}"), *named)


def test_index_replaced_by_an_older_one(backups: Backups, tmp_path: Path) -> None:
    b = backups
    (older,) = [k for k in b.new_keys[0] if k.startswith("index/")]
    (newer,) = [k for k in b.new_keys[1] if k.startswith("index/")]
    _put(b, newer, _get(b, older))

    _lists_both(b)
    name = f"object index {newer.split('/', 1)[1]}: authentication failed"
    _fails_naming(_run(b, "verify", "--read-data"), name)
    for which in (0, 1):
        _fails_naming(_restore(b, which, tmp_path / f"out{which}"), name)

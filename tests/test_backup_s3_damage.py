"""Damaged and missing packs in an S3 backup store, and a full disk while restoring from S3.

Packs are deleted or overwritten with boto3 directly. verify names the affected
backups and paths (and only those); restoring an affected file fails loudly and
leaves nothing under its name, while unaffected backups restore. A restore into
a small tmpfs fails with "no space left", naming the file, and keeps the files
it finished.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from layerfs.records import get_tree
from layerfs.store import packs
from layerfs.store.location import open_backend, open_store
from tests.support.s3backup import S3Store, backup, cli, fill_random, store_fixture
from volplugin.backup import service

pytestmark = pytest.mark.s3


store = store_fixture("bks3-dmg")


def _indexes(store: S3Store) -> list[dict[str, list[tuple[str, int, int]]]]:
    """Every index object in the bucket, opened with the repository's key and decoded."""
    client = store.env.client()
    backend = open_backend(store.url)
    try:
        out = []
        for rel in store.keys("index/"):
            index_id = rel.split("/", 1)[1]
            data = client.get_object(Bucket=store.bucket, Key=f"store/{rel}")["Body"].read()
            out.append(packs.decode_index(rel, backend.inner.sealer.open("index", index_id, data)))
        return out
    finally:
        backend.close()


def _pack_of(store: S3Store, digest: str) -> str:
    """The key (under the store prefix) of the pack holding a blob, from the index objects."""
    for index in _indexes(store):
        for pack_id, blobs in index.items():
            if any(d == digest for d, _, _ in blobs):
                return f"packs/{pack_id[:2]}/{pack_id}"
    raise AssertionError(f"no index names {digest}")


def _place(store: S3Store, digest: str) -> tuple[int, int]:
    for index in _indexes(store):
        for blobs in index.values():
            for d, offset, length in blobs:
                if d == digest:
                    return offset, length
    raise AssertionError(f"no index names {digest}")


def _chunks(store: S3Store, backup: dict, path: str) -> list[str]:
    entries, _ = get_tree(open_store(store.url), backup["tree"])
    return [c.digest for c in next(e for e in entries if e.path == path).chunks]


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".bk-restore-*"))


@pytest.fixture
def two_backups(store: S3Store, tmp_path: Path):
    """Backup A (file a.bin) and backup B (big.bin, 40 MiB: its first pack holds no tree)."""
    va, vb = tmp_path / "va", tmp_path / "vb"
    fill_random(va, 1, 3 << 20, seed=10, name="a.bin")
    (va / "note.txt").write_text("a note\n")
    fill_random(vb, 1, 40 << 20, seed=11, name="big.bin")
    (vb / "small.txt").write_text("small\n")
    return va, vb, backup(store, "bks3-a", va), backup(store, "bks3-b", vb)


def test_missing_pack_names_the_backup_and_path(store, two_backups, tmp_path) -> None:
    va, vb, a, b = two_backups
    first_chunk = _chunks(store, b, "big.bin000")[0]
    key = _pack_of(store, first_chunk)
    assert key != _pack_of(store, b["tree"]), "the tree should sit in the later pack"
    store.env.client().delete_object(Bucket=store.bucket, Key=f"store/{key}")

    proc = cli("verify", store=store.url, check=False)
    assert proc.returncode == 1
    assert f"backup {b['id']}" in proc.stdout and "big.bin000" in proc.stdout
    assert a["id"] not in proc.stdout and "small.txt" not in proc.stdout
    assert "damage found in" in proc.stderr and b["id"] in proc.stderr

    out = tmp_path / "out-b"
    proc = cli("restore", b["id"], "--to-dir", str(out), store=store.url, check=False)
    assert proc.returncode == 1 and "big.bin000" in proc.stderr, proc.stderr
    assert "missing" in proc.stderr
    assert not (out / "big.bin000").exists() and _leftovers(out) == []
    assert (out / "small.txt").read_text() == "small\n"

    out_a = tmp_path / "out-a"
    cli("restore", a["id"], "--to-dir", str(out_a), store=store.url)
    assert (out_a / "a.bin000").read_bytes() == (va / "a.bin000").read_bytes()


def test_corrupt_pack_found_by_read_data_and_never_restored(store, two_backups, tmp_path) -> None:
    va, vb, a, b = two_backups
    chunk = _chunks(store, a, "a.bin000")[1]
    key = _pack_of(store, chunk)
    offset, length = _place(store, chunk)
    client = store.env.client()
    data = bytearray(client.get_object(Bucket=store.bucket, Key=f"store/{key}")["Body"].read())
    data[offset + length // 2 : offset + length // 2 + 64] = bytes(64)  # same size, wrong bytes
    client.put_object(Bucket=store.bucket, Key=f"store/{key}", Body=bytes(data))

    cli("verify", store=store.url)  # every object is there: only reading finds the damage
    proc = cli("verify", "--read-data", store=store.url, check=False)
    assert proc.returncode == 1
    assert f"backup {a['id']}" in proc.stdout and "a.bin000" in proc.stdout
    assert b["id"] not in proc.stdout

    out = tmp_path / "out-a"
    proc = cli("restore", a["id"], "--to-dir", str(out), store=store.url, check=False)
    assert proc.returncode == 1 and "a.bin000" in proc.stderr, proc.stderr
    assert not (out / "a.bin000").exists() and _leftovers(out) == []
    assert (out / "note.txt").read_text() == "a note\n"

    out_b = tmp_path / "out-b"
    cli("restore", b["id"], "--to-dir", str(out_b), store=store.url)
    assert (out_b / "big.bin000").read_bytes() == (vb / "big.bin000").read_bytes()


def test_full_disk_during_restore_from_s3(store, tmp_path) -> None:
    vol = tmp_path / "v"
    fill_random(vol, 1, 1 << 20, seed=12, name="a")
    fill_random(vol, 1, 6 << 20, seed=13, name="b")
    record = backup(store, "bks3-full", vol)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "bks3-tmpfs", str(small)], check=True)
    try:
        proc = cli(
            "restore", record["id"], "--to-dir", str(small / "t"), store=store.url, check=False
        )
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("volplugin: error:")]
        assert len(errors) == 1, proc.stderr
        assert "no space left" in errors[0] and "while restoring b000:" in errors[0]
        assert sorted(p.name for p in (small / "t").iterdir()) == ["a000"]
        assert (small / "t" / "a000").read_bytes() == (vol / "a000").read_bytes()
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert [r.id for r in service.list_backups(open_store(store.url).backend)] == [record["id"]]

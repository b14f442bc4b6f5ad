"""The fast read-only path: packed stat, read-ahead, lean imports, and what reaches the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.fs.overlay import find_overlay
from layerfs.fs.views import ViewInfo
from layerfs.index.readahead import ReadAhead
from layerfs.store.chunks import ChunkRef, chunk_offsets
from layerfs.store.location import open_store
from tests.support.lfsmount import LAYERFS, mounted, public_dir
from tests.support.synthetic import d, f, make_image, sym

# -- unit: read-ahead ---------------------------------------------------


def _file(sizes: list[int]) -> tuple[list[ChunkRef], list[int]]:
    chunks = [ChunkRef(f"{i:032x}", n) for i, n in enumerate(sizes)]
    return chunks, chunk_offsets(chunks)


def test_read_ahead_fetches_the_next_window_of_a_sequential_read_only():
    fetched: list[str] = []
    ahead = ReadAhead(fetched.append, window=300, workers=2)
    chunks, offsets = _file([100] * 10)
    ahead.after_read("a", chunks, offsets, 0, 150)  # from the start: sequential
    ahead.close()
    assert sorted(fetched) == [c.digest for c in chunks[2:5]]  # starts 200, 300, 400 < 450
    fetched.clear()
    ahead.after_read("a", chunks, offsets, 150, 250)  # continues: only what is new
    ahead.close()
    assert fetched == [chunks[5].digest]
    fetched.clear()
    ahead.after_read("b", chunks, offsets, 700, 750)  # a jump into another file: nothing
    ahead.close()
    assert fetched == []


def test_read_ahead_swallows_fetch_errors_and_forgets_finished_fetches():
    def fail(digest: str) -> None:
        raise OSError("unreachable")

    ahead = ReadAhead(fail, window=1000, workers=1)
    chunks, offsets = _file([100] * 4)
    ahead.after_read("a", chunks, offsets, 0, 10)
    ahead.wait_for(chunks, offsets, 0, 400)  # returns although every fetch failed
    ahead.close()
    assert ahead._inflight == {}


def test_mount_command_imports_no_heavy_library():
    code = (
        "import sys, click\n"
        "from layerfs.cli import cli\n"
        "cli.get_command(click.Context(cli), 'mount')\n"
        "heavy = ('docker', 'boto3', 'botocore', 'rich', 'flask', 'layerfs.importer',"
        " 'layerfs.index.merge', 'pyfuse3', 'trio')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- real mounts ---------------------------------------------------------------------------

BIG = os.urandom(12_000_000)  # more than the daemon keeps (DAEMON_CHUNK_CACHE)


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    root = tmp_path_factory.mktemp("perfro-store")
    s = open_store(str(root))
    layer = [d(""), d("data"), f(s, "data/big", BIG), f(s, "data/small", b"s" * 1000)]
    layer += [sym("data/link", "big")] + [f(s, f"many/f{i}", b"%d" % i) for i in range(300)]
    make_image(s, "perfro/fast:1", [layer])
    return root


def _daemon_reads(store: Path, mnt: Path) -> int:
    """Bytes the image's view daemon has read from files so far (its /proc io counter)."""
    pid = ViewInfo.load(find_overlay(mnt).lowers[0]).pid
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar line")


@pytest.mark.fuse
def test_content_stays_in_the_page_cache_across_opens(image_store):
    with public_dir("perfro-") as base, mounted(image_store, "perfro/fast:1", base / "m") as m:
        assert (m / "data/big").read_bytes() == BIG  # sequential: fetched ahead, in order
        with open(m / "data/big", "rb") as fh:
            fh.seek(1_234_567)
            assert fh.read(100_000) == BIG[1_234_567:1_334_567]
        before = _daemon_reads(image_store, m)
        for _ in range(3):
            assert (m / "data/big").read_bytes() == BIG
        assert _daemon_reads(image_store, m) - before < len(BIG) // 2


@pytest.mark.fuse
def test_listing_a_large_directory_gives_names_types_and_inodes(image_store):
    with public_dir("perfro-") as base, mounted(image_store, "perfro/fast:1", base / "m") as m:
        with os.scandir(m / "many") as it:
            entries = {e.name: (e.inode(), e.is_file(follow_symlinks=False)) for e in it}
        assert sorted(entries) == sorted(f"f{i}" for i in range(300))
        for name in ("f0", "f299"):
            assert entries[name] == (os.lstat(m / "many" / name).st_ino, True)
        assert (m / "many/f42").read_bytes() == b"42"
        assert os.readlink(m / "data/link") == "big"


@pytest.mark.fuse
def test_mount_with_a_relative_store_path(image_store, tmp_path):
    with public_dir("perfro-") as base:
        mnt = base / "m"
        mnt.mkdir()
        rel = os.path.relpath(image_store, tmp_path)
        proc = subprocess.run(
            [LAYERFS, "--store", rel, "mount", "perfro/fast:1", str(mnt)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            assert proc.returncode == 0, proc.stderr
            assert (mnt / "data/small").read_bytes() == b"s" * 1000
        finally:
            subprocess.run([LAYERFS, "--store", str(image_store), "umount", str(mnt)], check=False)

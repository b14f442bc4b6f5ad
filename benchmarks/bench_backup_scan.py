"""bench_backup_scan: the backup walk alone (volplugin.backup.snapshot.Scanner), no S3.

A first scan of TREE into a fresh local store (zstd level 3, as backups use),
then REPS rescans with the first as parent (nothing changed: the incremental
path, lstat only), three times over; prints the medians of CPU and wall time.
Make the tree with benchmarks.bench_backup.make_tree (bench_backup's tree,
400 MiB, seed 7), then run

    .venv/bin/python -m benchmarks.bench_backup_scan --make /tmp/scantree
    .venv/bin/python -m benchmarks.bench_backup_scan /tmp/scantree 10
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_store
from volplugin.backup.snapshot import META_STAT, ParentIndex, Scanner


def _timed(fn) -> tuple[float, float, object]:  # noqa: ANN001
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def main() -> None:
    if sys.argv[1] == "--make":
        from benchmarks.bench_backup import make_tree

        make_tree(Path(sys.argv[2]), 400 << 20, 7)
        return
    tree, reps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10
    firsts: list[tuple[float, float]] = []
    rescans: list[tuple[float, float]] = []
    for _ in range(3):
        scratch = Path(tempfile.mkdtemp(prefix="bench-scan-"))
        try:
            store = open_store(str(scratch / "store"))
            writer = ChunkStore(store.backend, cache_bytes=0, level=3)

            def first(writer: ChunkStore = writer):  # noqa: ANN202
                result = Scanner(writer, tree, ParentIndex()).scan()
                writer.flush()
                return result

            cpu, wall, result = _timed(first)
            firsts.append((cpu, wall))
            parent = ParentIndex.from_docs(result.docs, {META_STAT: result.stat})
            for _ in range(reps):
                cpu, wall, again = _timed(
                    lambda writer=writer, parent=parent: Scanner(writer, tree, parent).scan()
                )
                assert again.files_read == 0, "the tree changed during the rescans"
                rescans.append((cpu, wall))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def med(xs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(x[i] for x in xs)

    print(f"files {result.files}, entries {len(result.docs)}")
    print(
        f"first scan (local store, zstd 3): CPU {med(firsts, 0):.3f} s, "
        f"wall {med(firsts, 1):.3f} s (median of 3)"
    )
    print(
        f"unchanged rescan: CPU {med(rescans, 0) * 1000:.1f} ms, "
        f"wall {med(rescans, 1) * 1000:.1f} ms (median of {len(rescans)})"
    )


if __name__ == "__main__":
    main()

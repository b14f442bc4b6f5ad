"""bench_s3: the S3 store on the local Ceph RGW: throughput, requests and objects per GB.

Writes DATA of content (half random, half repeated blocks that deduplicate) into a
fresh bucket through a ChunkStore under a writer lease, then reads it back on a
fresh backend with an empty local cache (cold: range GETs) and again (warm: the
cache). Requests are counted by the store's boto3 event hooks. Writes the
`s3` section of benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.bench_s3 [--mb 512] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil

from benchmarks.common import (
    WORK_DIR,
    command_line,
    compile_bytecode,
    environment_summary,
    human_bytes,
    markdown_table,
    stopwatch,
    write_section,
)
from layerfs.store.chunks import ChunkStore
from layerfs.store.s3 import S3Backend
from tests.support import ceph


def content(total: int) -> bytes:
    block = os.urandom(1 << 20)
    parts = [os.urandom(1 << 20) if i % 2 else block for i in range(total >> 20)]
    return b"".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="MiB of content to write")
    parser.add_argument("--quick", action="store_true", help="64 MiB only")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    compile_bytecode()
    size = (64 if args.quick else args.mb) << 20
    env = ceph.ensure_rgw()
    env.export()
    bucket = ceph.new_bucket(env, "bench")
    work = WORK_DIR / "s3"
    shutil.rmtree(work, ignore_errors=True)
    try:
        data = content(size)
        writer = S3Backend(bucket, "bench", cache_root=work / "w")
        store = ChunkStore(writer)
        with stopwatch() as t_write, writer.lock(False):
            refs = store.write_bytes(data)
            store.flush()
        w = writer.stats.snapshot()
        objects = len(writer.pack_names()) + len(writer.objects.list("index/"))

        reader = S3Backend(bucket, "bench", cache_root=work / "r")
        cold = ChunkStore(reader, cache_bytes=0)
        with stopwatch() as t_cold:
            for _ in cold.iter_content(refs):
                pass
        r = reader.stats.snapshot()
        warm = ChunkStore(reader, cache_bytes=0)
        with stopwatch() as t_warm:
            for _ in warm.iter_content(refs):
                pass
        r2 = reader.stats.snapshot()
    finally:
        ceph.remove_bucket(env, bucket)
        shutil.rmtree(work, ignore_errors=True)

    gb = size / 2**30
    rows = [
        [
            "write",
            f"{size / 2**20 / t_write[0]:.0f} MiB/s",
            w["total_requests"],
            f"{w['total_requests'] / gb:.0f}",
            human_bytes(w["bytes_up"]),
            ", ".join(f"{k} {v}" for k, v in sorted(w["requests"].items())),
        ],
        [
            "cold read",
            f"{size / 2**20 / t_cold[0]:.0f} MiB/s",
            r["total_requests"],
            f"{r['total_requests'] / gb:.0f}",
            human_bytes(r["bytes_down"]),
            ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items())),
        ],
        [
            "warm read",
            f"{size / 2**20 / t_warm[0]:.0f} MiB/s",
            r2["total_requests"] - r["total_requests"],
            f"{(r2['total_requests'] - r['total_requests']) / gb:.0f}",
            human_bytes(r2["bytes_down"] - r["bytes_down"]),
            "local cache",
        ],
    ]
    text = "\n\n".join(
        [
            "## bench_s3: the S3 store on the local Ceph RGW",
            environment_summary(load),
            f"`{command_line()}`: {human_bytes(size)} of content, {len(refs)} chunks, "
            f"{objects} objects in the bucket ({objects / gb:.0f} per GiB of content: "
            f"{w['packs_written']} packs, {w['indexes_written']} index).",
            markdown_table(
                ["pass", "speed", "requests", "requests/GiB", "bytes moved", "by operation"], rows
            ),
        ]
    )
    print(text)
    if not args.no_write:
        write_section("s3", text)


if __name__ == "__main__":
    main()

"""bench_backup: volume backups to S3 (Ceph RGW): volplugin vs restic vs tar+gzip.

One run, side by side, on one generated tree (``--size`` MiB, default 2048; 200
with ``--quick``): many small text files, some large incompressible ones and
some duplicated content, made deterministically from ``--seed``. Every tool
stores into its own bucket of the same RGW:

* volplugin: the backup service (`volplugin backup`'s code) on an s3:// store;
* restic (/usr/bin/restic, s3 backend, compression auto);
* the sidekick baseline: ``tar -c | gzip | upload`` of the whole volume each time,
  restored by ``download | gunzip | tar -x``.

Figures: first backup, second backup after changing 1% of the files, a restore
of the second backup (fresh local caches: a new host; before each tool's restore
the disk synced and the kernel's page cache dropped, so no restore pays for writing
back another's files or for reclaiming the memory the backups left cached, and the
restored trees removed only once all are done, so none pays for deleting another's;
restic and volplugin restore twice, the second time in the other order, and the
mean counts), bytes and objects in the bucket, peak RSS of each process tree (sum of
VmHWM), and for volplugin the S3 requests per GiB (the store's request counters).
The RGW runs as a private cluster (memstore sized for the run) under
benchmarks/work/backup/ceph unless ``--shared-ceph``. Writes the `backup` section of
benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.bench_backup [--quick] [--size MIB] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    REPO_DIR,
    WORK_DIR,
    BenchError,
    command_line,
    compile_bytecode,
    drop_caches,
    environment_summary,
    human_bytes,
    markdown_table,
    peak_rss_bytes,
    process_tree,
    require_tools,
    write_section,
)

WORK = WORK_DIR / "backup"
PYTHON = sys.executable
PASSWORD = "bench-backup-password"
PRIVATE_CEPH = {
    "LAYERFS_CEPH_DIR": str(WORK / "ceph"),
    "LAYERFS_RGW_PORT": "7495",
    "LAYERFS_CEPH_MON_PORT": "13395",
}


# -- the tree ----------------------------------------------------------------------------


def _corpus(rnd: random.Random, size: int) -> bytes:
    """Text-like bytes (words of a random vocabulary), compressible about 3:1."""
    words = [
        bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10)))
        for _ in range(4000)
    ]
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rnd.choices(words, k=12))
        out += line + (b".\n" if rnd.random() < 0.3 else b"\n")
    return bytes(out[:size])


def make_tree(root: Path, total: int, seed: int) -> list[Path]:
    """About ``total`` bytes: 35% small text files, 50% large random files, 15% copies."""
    rnd = random.Random(seed)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    corpus = _corpus(rnd, 16 << 20)
    files: list[Path] = []
    small_budget, large_budget = int(total * 0.35), int(total * 0.50)
    written = 0
    while written < small_budget:
        size = int(2 ** rnd.uniform(9, 17))  # 512 B .. 128 KiB, log-uniform
        start = rnd.randrange(len(corpus) - size)
        path = root / f"d{rnd.randrange(40):02}" / f"s{rnd.randrange(8)}" / f"f{len(files):06}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(corpus[start : start + size])
        files.append(path)
        written += size
    (root / "large").mkdir()
    written = 0
    while written < large_budget:
        size = min(rnd.randrange(16 << 20, 96 << 20), large_budget - written + (1 << 20))
        path = root / "large" / f"big{len(files):06}.bin"
        path.write_bytes(rnd.randbytes(size))
        files.append(path)
        written += size
    (root / "copies").mkdir()
    budget, written = int(total * 0.15), 0
    while written < budget:
        src = rnd.choice(files)
        dst = root / "copies" / f"c{len(files):06}-{src.name}"
        shutil.copyfile(src, dst)
        files.append(dst)
        written += dst.stat().st_size
    return files


def make_small_tree(root: Path, count: int, seed: int) -> list[Path]:
    """``count`` text files of 1-4 KiB, 100 per directory, two levels deep."""
    rnd = random.Random(seed)
    shutil.rmtree(root, ignore_errors=True)
    corpus = _corpus(rnd, 4 << 20)
    files: list[Path] = []
    for i in range(count):
        folder = root / f"d{i // 10000:03}" / f"s{i // 100 % 100:02}"
        if i % 100 == 0:
            folder.mkdir(parents=True)
        size = rnd.randrange(1024, 4096)
        start = rnd.randrange(len(corpus) - size)
        path = folder / f"f{i:07}.txt"
        path.write_bytes(corpus[start : start + size])
        files.append(path)
    return files


def change_files(files: list[Path], seed: int, share: float = 0.01) -> int:
    """Change ``share`` of the files: rewrite small ones, patch 1 MiB inside large ones."""
    rnd = random.Random(seed + 1)
    chosen = rnd.sample(files, max(1, int(len(files) * share)) if share < 1 else int(share))
    for path in chosen:
        size = path.stat().st_size
        if size <= 1 << 20:
            path.write_bytes(rnd.randbytes(size // 2) + path.read_bytes()[size // 2 :])
        else:
            with open(path, "r+b") as f:
                f.seek(rnd.randrange(size - (1 << 20)))
                f.write(rnd.randbytes(1 << 20))
    return len(chosen)


# -- running and measuring -----------------------------------------------------------------


@dataclass
class Measure:
    """One timed step: wall and CPU seconds, peak RSS of its process tree, what it printed."""

    seconds: float = 0.0
    cpu: float = 0.0  # user + system seconds of the process tree (children waited for)
    peak_rss: int = 0
    stdout: str = ""
    extra: dict = field(default_factory=dict)


def measured(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> Measure:
    """Run a command; sample the VmHWM of its process tree until it ends."""
    peaks: dict[int, int] = {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    err: list[str] = []
    reader_err = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    reader_err.start()
    while proc.poll() is None:
        for pid in process_tree(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0), peak_rss_bytes([pid]))
        time.sleep(0.05)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    reader.join()
    reader_err.join()
    if proc.returncode != 0:
        raise BenchError(f"{cmd} failed ({proc.returncode}): {''.join(err)[-3000:]}")
    return Measure(seconds, cpu, sum(peaks.values()), "".join(out))


def bucket_usage(client, bucket: str) -> tuple[int, int]:
    """(bytes, objects) in a bucket."""
    size = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            size += obj["Size"]
            count += 1
    return size, count


# -- the three tools ------------------------------------------------------------------------

_CHILD = """
import json, sys
from pathlib import Path
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_backend
from layerfs.memory import return_large_buffers
from volplugin.backup import service
return_large_buffers()  # as the `volplugin` command does first
op, url = sys.argv[1], sys.argv[2]
backend = open_backend(url)  # the encrypted repository (LAYERFS_PASSWORD_FILE)
store = ChunkStore(backend)
if op == "backup":
    record = service.create_backup(store, "bench", Path(sys.argv[3]))
    out = {"id": record.id, "bytes_new": record.bytes_new, "files_read": record.files_read}
else:
    record, result = service.restore_backup(store, sys.argv[3], Path(sys.argv[4]))
    out = {"files": result.files, "bytes": result.bytes}
backend.close()
out["stats"] = getattr(backend, "inner", backend).stats.snapshot()
print(json.dumps(out))
"""

_UPLOAD = """
import sys, boto3
from botocore.config import Config
c = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
c.upload_fileobj(sys.stdin.buffer, sys.argv[1], sys.argv[2])
"""

_DOWNLOAD = """
import sys, boto3
from botocore.config import Config
c = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
body = c.get_object(Bucket=sys.argv[1], Key=sys.argv[2])["Body"]
for chunk in body.iter_chunks(1 << 20):
    sys.stdout.buffer.write(chunk)
"""


class Volplugin:
    name = "volplugin"

    def __init__(self, bucket: str, env: dict[str, str]) -> None:
        self.url = f"s3://{bucket}/bench"
        password = WORK / "password"
        password.write_text(PASSWORD + "\n")
        env = {k: v for k, v in env.items() if not k.startswith("LAYERFS_TESTONLY")}
        self.env = dict(env, LAYERFS_PASSWORD_FILE=str(password))
        self.last_id = ""
        # encrypted, with the default KDF parameters (restic init uses its defaults too)
        subprocess.run(
            [str(Path(PYTHON).with_name("layerfs")), "--store", self.url, "init"],
            env=self.env,
            check=True,
            capture_output=True,
        )

    def backup(self, tree: Path, cache: Path) -> Measure:
        env = dict(self.env, LAYERFS_CACHE_DIR=str(cache))
        m = measured([PYTHON, "-c", _CHILD, "backup", self.url, str(tree)], env)
        m.extra = json.loads(m.stdout)
        self.last_id = m.extra["id"]
        return m

    def restore(self, target: Path, cache: Path) -> Measure:
        env = dict(self.env, LAYERFS_CACHE_DIR=str(cache))
        m = measured([PYTHON, "-c", _CHILD, "restore", self.url, self.last_id, str(target)], env)
        m.extra = json.loads(m.stdout)
        return m


class Restic:
    name = "restic"

    def __init__(self, bucket: str, env: dict[str, str], endpoint: str) -> None:
        self.env = dict(env, RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=f"s3:{endpoint}/{bucket}")
        subprocess.run(["restic", "init"], env=self.env, check=True, capture_output=True)

    def backup(self, tree: Path, cache: Path) -> Measure:
        env = dict(self.env, RESTIC_CACHE_DIR=str(cache))
        return measured(["restic", "backup", "--quiet", "--host", "bench", str(tree)], env)

    def restore(self, target: Path, cache: Path) -> Measure:
        env = dict(self.env, RESTIC_CACHE_DIR=str(cache))
        return measured(["restic", "restore", "--quiet", "latest", "--target", str(target)], env)


class TarGzip:
    name = "tar+gzip"

    def __init__(self, bucket: str, env: dict[str, str]) -> None:
        self.bucket = bucket
        self.env = env
        self.count = 0

    def backup(self, tree: Path, cache: Path) -> Measure:
        self.count += 1
        key = f"volume-{self.count}.tar.gz"
        script = f"tar -C {tree} -cf - . | gzip -6 | {PYTHON} -c '{_UPLOAD}' {self.bucket} {key}"
        return measured(["/bin/bash", "-o", "pipefail", "-c", script], self.env)

    def restore(self, target: Path, cache: Path) -> Measure:
        target.mkdir(parents=True, exist_ok=True)
        key = f"volume-{self.count}.tar.gz"
        script = f"{PYTHON} -c '{_DOWNLOAD}' {self.bucket} {key} | gzip -dc | tar -C {target} -xf -"
        return measured(["/bin/bash", "-o", "pipefail", "-c", script], self.env)


# -- the run --------------------------------------------------------------------------------


def start_ceph(shared: bool, size: int):
    if not shared:
        gb = max(4, int(size * 3.2 / 2**30) + 3)
        os.environ.update(PRIVATE_CEPH, LAYERFS_CEPH_GB=str(gb))
    from tests.support import ceph

    env = ceph.ensure_rgw()
    env.export()
    return ceph, env


def stop_ceph(shared: bool) -> None:
    if not shared:
        subprocess.run(
            ["bash", str(REPO_DIR / "scripts" / "ceph-rgw-down.sh")],
            env=dict(os.environ),
            capture_output=True,
        )


def _mean(runs: list[Measure]) -> Measure:
    """The runs' mean time and CPU, their highest peak RSS, the first one's output."""
    return Measure(
        sum(m.seconds for m in runs) / len(runs),
        sum(m.cpu for m in runs) / len(runs),
        max(m.peak_rss for m in runs),
        runs[0].stdout,
        runs[0].extra,
    )


def _fmt_ratio(a: float, b: float, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}×" if b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="MiB of tree (default 2048)")
    parser.add_argument("--quick", action="store_true", help="a 200 MiB tree")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shared-ceph", action="store_true", help="use the tests' RGW")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--small-files",
        type=int,
        default=0,
        metavar="N",
        help="a tree of N small files instead, 100 of them changed before the second backup",
    )
    args = parser.parse_args()
    require_tools("restic", "tar", "gzip", "radosgw")
    for old in WORK.glob("restore-*"):  # left by an interrupted run
        shutil.rmtree(old, ignore_errors=True)
    load = os.getloadavg()[0]
    compile_bytecode()
    size = (200 if args.quick else args.size) << 20
    tree = WORK / "tree"
    if args.small_files:
        print(f"generating {args.small_files} small files (seed {args.seed}) ...", flush=True)
        files = make_small_tree(tree, args.small_files, args.seed)
    else:
        print(f"generating a {human_bytes(size)} tree (seed {args.seed}) ...", flush=True)
        files = make_tree(tree, size, args.seed)
    apparent = sum(p.stat().st_size for p in files)
    os.sync()
    ceph, s3 = start_ceph(args.shared_ceph, size)
    client = s3.client()
    env = dict(os.environ)
    tools, buckets = [], []
    rows: dict[str, dict[str, object]] = {}
    try:
        for cls in (Restic, Volplugin, TarGzip):
            bucket = ceph.new_bucket(s3, f"bench-{cls.name.replace('+', '')}")
            buckets.append(bucket)
            tool = cls(bucket, env, s3.endpoint) if cls is Restic else cls(bucket, env)
            tools.append((tool, bucket))
        for phase in ("first", "second"):
            if phase == "second":
                for tool, bucket in tools:
                    rows[tool.name]["after_first"] = bucket_usage(client, bucket)
                changed = change_files(files, args.seed, 100 if args.small_files else 0.01)
                os.sync()
            for tool, _ in tools:
                print(f"{tool.name}: {phase} backup ...", flush=True)
                m = tool.backup(tree, WORK / f"cache-{tool.name}")
                rows.setdefault(tool.name, {})[phase] = m
        for tool, bucket in tools:
            rows[tool.name]["stored"] = bucket_usage(client, bucket)
        # restic and volplugin restore twice, in both orders (the disk's state after one
        # restore moves the next one's time by up to a fifth here); the mean counts
        restorers = [tool for tool, _ in tools]
        restorers += [tool for tool in reversed(restorers) if tool.name != TarGzip.name]
        samples: dict[str, list[Measure]] = {}
        for i, tool in enumerate(restorers):
            out = WORK / f"restore-{tool.name}-{i}"
            fresh = WORK / f"cache-restore-{tool.name}"
            shutil.rmtree(fresh, ignore_errors=True)
            drop_caches()
            print(f"{tool.name}: restore ...", flush=True)
            samples.setdefault(tool.name, []).append(tool.restore(out, fresh))
        for name, runs in samples.items():
            rows[name]["restore"] = _mean(runs)
            rows[name]["restore_samples"] = runs
    finally:
        for out in WORK.glob("restore-*"):
            shutil.rmtree(out, ignore_errors=True)
        for bucket in buckets:
            ceph.remove_bucket(s3, bucket)
        stop_ceph(args.shared_ceph)
        for p in WORK.glob("cache-*"):
            shutil.rmtree(p, ignore_errors=True)
    report(args, load, size, apparent, len(files), changed, rows)
    shutil.rmtree(tree, ignore_errors=True)


def report(args, load, size, apparent, nfiles, changed, rows) -> None:  # noqa: ANN001
    gib = apparent / 2**30
    table = []
    for name, r in rows.items():
        stored, objects = r["stored"]
        table.append(
            [
                name,
                f"{r['first'].seconds:.1f}",
                f"{r['second'].seconds:.1f}",
                f"{r['restore'].seconds:.1f}",
                f"{r['first'].cpu:.1f} / {r['second'].cpu:.1f}",
                human_bytes(stored),
                objects,
                human_bytes(max(r["first"].peak_rss, r["second"].peak_rss)),
                human_bytes(r["restore"].peak_rss),
            ]
        )
    vp, rs = rows["volplugin"], rows["restic"]
    ratios = ", ".join(
        f"{what} {_fmt_ratio(vp[key].seconds, rs[key].seconds)}"
        for what, key in (("first backup", "first"), ("second", "second"), ("restore", "restore"))
    )
    cpu_ratios = ", ".join(
        f"{what} {_fmt_ratio(vp[key].cpu, rs[key].cpu)}"
        for what, key in (("first backup", "first"), ("second", "second"))
    )
    first, second = vp["first"].extra["stats"], vp["second"].extra["stats"]
    rest = vp["restore"].extra["stats"]
    stats_lines = [
        f"- first backup: {first['total_requests']} requests "
        f"({first['total_requests'] / gib:.0f}/GiB), {first['packs_written']} packs, "
        f"{first['indexes_written']} indexes, {human_bytes(first['bytes_up'])} up",
        f"- second backup: {second['total_requests']} requests, "
        f"{human_bytes(second['bytes_up'])} up, {vp['second'].extra['files_read']} files read",
        f"- restore: {rest['total_requests']} requests ({rest['total_requests'] / gib:.0f}/GiB), "
        f"{human_bytes(rest['bytes_down'])} down",
        f"- objects in the bucket per GiB backed up: {vp['stored'][1] / gib:.1f} "
        f"(restic {rs['stored'][1] / gib:.1f})",
        "- requests by operation, first backup: "
        + ", ".join(f"{k} {v}" for k, v in sorted(first["requests"].items())),
    ]
    text = "\n\n".join(
        [
            "## bench_backup: volume backups to S3 (Ceph RGW)"
            + (f", {nfiles} small files" if args.small_files else ""),
            environment_summary(load),
            f"`{command_line()}`: a tree of {nfiles} files, {human_bytes(apparent)} "
            + (
                f"(text files of 1-4 KiB, 100 per directory; seed {args.seed}); the second "
                f"backup follows a change to {changed} files. "
                if args.small_files
                else f"(35% small text files, 50% large random files, 15% copies; seed "
                f"{args.seed}); the second backup follows a change to {changed} files (1%). "
            )
            + "Both tools encrypt (volplugin: an encrypted repository with the default KDF "
            "parameters). Restores start with empty local caches, after the disk was synced "
            "and the kernel's caches dropped; restic and volplugin restore twice, in both "
            "orders. "
            "Times in seconds (wall clock; the CPU column is user + "
            "system time of each backup's process tree, less sensitive to other load); RSS "
            "is the sum of VmHWM over each process tree; stored bytes and objects are the "
            "bucket after both backups.",
            markdown_table(
                [
                    "tool",
                    "first backup",
                    "second backup",
                    "restore",
                    "backup CPU s (first / second)",
                    "stored",
                    "objects",
                    "peak RSS backup",
                    "peak RSS restore",
                ],
                table,
            ),
            f"volplugin / restic time: {ratios} (target ≤ 1.0×); CPU time: {cpu_ratios}. "
            f"Stored bytes {_fmt_ratio(vp['stored'][0], rs['stored'][0], 3)} "
            f"({vp['stored'][0]:,} against {rs['stored'][0]:,}), objects "
            f"{_fmt_ratio(vp['stored'][1], rs['stored'][1])} of restic's (target ≤ 1.0×).",
            "Restores (seconds, in the order they ran; the table shows the mean): "
            + "; ".join(
                f"{name} " + ", ".join(f"{m.seconds:.1f}" for m in r["restore_samples"])
                for name, r in rows.items()
            )
            + ".",
            "Bytes the second backup added to the bucket: "
            + ", ".join(
                f"{name} {human_bytes(r['stored'][0] - r['after_first'][0])}"
                for name, r in rows.items()
            )
            + ".",
            "volplugin's S3 requests (the store's counters):\n\n" + "\n".join(stats_lines),
        ]
    )
    print(text)
    if not args.no_write:
        write_section("backup-small-files" if args.small_files else "backup", text)


if __name__ == "__main__":
    main()

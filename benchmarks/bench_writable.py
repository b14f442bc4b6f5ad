"""Writable mounts side by side: layerfs --upper vs fuse-overlayfs vs kernel overlayfs.

All three mount the same image's layers with a fresh, empty upper directory
(layerfs from its store, the overlays from the daemon's own overlay2 layer
directories) and run, in order:

* untar a 5,000-file tree into the mount;
* a 1-byte write into a 100 MB lower file (copy-up);
* chmod of a 1 GB lower file;
* rename of a lower directory with 1,000 files (with `mv`: the overlays answer
  rename(2) of a lower directory with EXDEV and `mv` then copies; layerfs renames);
* `rm -rf` of a 5,000-file lower tree;
* fio 4k random writes on a new 64 MB file;
* and, for layerfs, `layerfs commit` of all these changes (the overlays have no
  commit; the time to tar their upper directory is shown for scale).

A layerfs mount is a kernel overlay over the image's view and the store's
content cache (``lowerdir=VIEW::CACHE``) with the upper directory of --upper;
the content cache is filled once before the rounds (a mount, then waiting
until the view has every file in it), as it stays on disk from mount to mount.

Each step is timed with cold caches, the whole sequence is repeated, and the
median is reported, with each step's ratio to kernel overlayfs and to
fuse-overlayfs and the issue's targets. Results go to the ``<!-- writable -->``
section of benchmarks/RESULTS.md. Run as root:
``.venv/bin/python -m benchmarks.bench_writable [--rounds N]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_readonly import image_id, overlay_lowerdirs
from benchmarks.common import (
    WORK_DIR,
    BenchError,
    command_line,
    compile_bytecode,
    drop_caches,
    environment_summary,
    force_unmount_under,
    markdown_table,
    require_root,
    require_tools,
    run,
    wait_mounted,
    write_section,
)
from benchmarks.layerfs_views import (
    mount_layers,
    mount_log_summary,
    stop_views,
    view_pids,
    wait_content_cached,
    wait_gone,
)

LAYERFS = [str(Path(sys.executable).with_name("layerfs"))]  # the venv's entry point
TAG = "bench/writable:latest"
DOCKERFILE = """\
FROM {base}
RUN dd if=/dev/urandom of=/big100 bs=1M count=100 2>/dev/null
RUN dd if=/dev/urandom of=/big1g bs=1M count={gig_mb} 2>/dev/null
RUN mkdir /dir1000 && i=0; while [ $i -lt 1000 ]; do echo $i > /dir1000/f$i; i=$((i+1)); done
RUN mkdir /tree5000 && d=0; while [ $d -lt 50 ]; do mkdir /tree5000/d$d; f=0; \
    while [ $f -lt 100 ]; do echo $d$f > /tree5000/d$d/f$f; f=$((f+1)); done; d=$((d+1)); done
"""
# The targets: (step, limit of layerfs ÷ kernel overlayfs); and every one of
# these steps at most as slow as fuse-overlayfs.
KERNEL_TARGETS = [
    ("untar 5,000 files", 1.2),
    ("fio 4k randwrite", 1.2),
    ("rm -rf 5,000 files", 1.2),
]
STEPS = [
    "untar 5,000 files",
    "1-byte write, 100 MB file",
    "chmod 1 GB file",
    "rename dir of 1,000",
    "rm -rf 5,000 files",
    "fio 4k randwrite",
    "commit",
]


def say(msg: str) -> None:
    print(f"[bench_writable] {msg}", flush=True)


def ensure_image(quick: bool) -> str:
    tag = TAG.replace("latest", "quick") if quick else TAG
    if image_id(tag):
        return tag
    from tests.support.dockerenv import docker_build, ensure_busybox_image, ensure_dockerd

    base = ensure_busybox_image(ensure_dockerd())
    ctx = WORK_DIR / "writable-context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(base=base, gig_mb=128 if quick else 1024))
    say(f"building {tag}")
    docker_build(ctx, tag)
    shutil.rmtree(ctx, ignore_errors=True)
    return tag


def untar_source(path: Path) -> Path:
    """A tar of 5,000 small files in 50 directories (made once)."""
    if path.exists():
        return path
    with tarfile.open(path, "w") as tar:
        for d in range(50):
            info = tarfile.TarInfo(f"d{d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
            for f in range(100):
                data = f"file {d}/{f}\n".encode() * 8
                info = tarfile.TarInfo(f"d{d}/f{f}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class System:
    name: str
    mount: Callable[[Path, Path], None]  # (upper base dir, mountpoint)
    umount: Callable[[Path], None]
    commit: Callable[[Path, Path], None]  # (upper base dir, mountpoint)


def overlay_systems(tag: str, store: Path) -> list[System]:
    lowers = overlay_lowerdirs(tag)

    def kernel_mount(base: Path, mnt: Path) -> None:
        (base / "upper").mkdir()
        (base / "work").mkdir()
        opts = f"lowerdir={lowers},upperdir={base / 'upper'},workdir={base / 'work'}"
        run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])

    def fuse_mount(base: Path, mnt: Path) -> None:
        (base / "upper").mkdir()
        (base / "work").mkdir()
        opts = f"lowerdir={lowers},upperdir={base / 'upper'},workdir={base / 'work'}"
        run(["fuse-overlayfs", "-o", opts, str(mnt)])
        wait_mounted(mnt)

    def tar_upper(base: Path, mnt: Path) -> None:
        run(["sh", "-c", f"tar -C {base / 'upper'} -cf - . | wc -c"])

    def layerfs_mount(base: Path, mnt: Path) -> None:
        run([*LAYERFS, "--store", str(store), "mount", tag, str(mnt), "--upper", str(base)])

    def layerfs_commit(base: Path, mnt: Path) -> None:
        run([*LAYERFS, "--store", str(store), "commit", str(mnt), "--tag", "bench/committed:1"])

    def umount(mnt: Path) -> None:
        run(["umount", str(mnt)])

    def layerfs_umount(mnt: Path) -> None:
        run([*LAYERFS, "--store", str(store), "umount", str(mnt)])

    return [
        System("layerfs", layerfs_mount, layerfs_umount, layerfs_commit),
        System("fuse-overlayfs", fuse_mount, umount, tar_upper),
        System("kernel overlayfs", kernel_mount, umount, tar_upper),
    ]


def timed(fn: Callable[[], object]) -> float:
    subprocess.run(["sync"], check=True)
    drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(system: System, base: Path, mnt: Path, tree_tar: Path) -> dict[str, float]:
    system.mount(base, mnt)
    out: dict[str, float] = {}
    try:
        (mnt / "untar").mkdir()
        out[STEPS[0]] = timed(lambda: run(["tar", "-xf", str(tree_tar), "-C", str(mnt / "untar")]))

        def poke() -> None:
            with open(mnt / "big100", "r+b") as f:
                f.seek(50_000_000)
                f.write(b"x")

        out[STEPS[1]] = timed(poke)
        out[STEPS[2]] = timed(lambda: os.chmod(mnt / "big1g", 0o600))
        out[STEPS[3]] = timed(
            lambda: run(["mv", str(mnt / "dir1000"), str(mnt / "dir1000-renamed")])
        )
        out[STEPS[4]] = timed(lambda: run(["rm", "-rf", str(mnt / "tree5000")]))
        out[STEPS[5]] = timed(
            lambda: run(
                [
                    "fio",
                    "--name=rw",
                    f"--filename={mnt / 'fio.dat'}",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--size=64M",
                    "--ioengine=psync",
                    "--end_fsync=1",
                    "--output-format=json",
                ]
            )
        )
        out[STEPS[6]] = timed(lambda: system.commit(base, mnt))
    finally:
        system.umount(mnt)
    return out


def warm_content_cache(tag: str, store: Path, work: Path) -> tuple[float, str]:
    """Mount the image once and wait until every file's content is in the content cache;
    return the seconds from the mount until then, and the overlay's layers."""
    mnt = work / "mnt-fill"
    mnt.mkdir()
    start = time.perf_counter()
    run([*LAYERFS, "--store", str(store), "mount", tag, str(mnt)])
    try:
        wait_content_cached(mnt)
        seconds = time.perf_counter() - start
        daemons = view_pids([mnt])
        layers = mount_layers(mnt, store)
    finally:
        run([*LAYERFS, "--store", str(store), "umount", str(mnt)])
    wait_gone(daemons)
    mnt.rmdir()
    return seconds, layers


@dataclass
class Results:
    rounds: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    cache_fill: float | None = None  # seconds from a first mount to a full content cache
    layers: str = ""  # layerfs's overlay layers, as mounted (read-only)
    mount_log: str = ""  # what the store's mount log says after the rounds

    def median(self, system: str, step: str) -> float:
        values = sorted(r[step] for r in self.rounds[system])
        return values[len(values) // 2]

    def spread(self, system: str, step: str) -> str:
        values = [r[step] * 1000 for r in self.rounds[system]]
        return f"{min(values):.0f}–{max(values):.0f}"


def ratio_text(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def targets_table(results: Results) -> str:
    """The issue's targets for the writable steps, met or missed."""
    rows = []
    checks = [(f"{s} ÷ kernel overlayfs", s, "kernel overlayfs", lim) for s, lim in KERNEL_TARGETS]
    checks += [(f"{s} ÷ fuse-overlayfs", s, "fuse-overlayfs", 1.0) for s, _ in KERNEL_TARGETS]
    for label, step, peer, limit in checks:
        value = results.median("layerfs", step) / results.median(peer, step)
        verdict = "met" if value <= limit else "**missed**"
        rows.append([label, f"≤ {limit:g}×", f"{value:.2f}×", verdict])
    return markdown_table(["target", "limit", "layerfs", "verdict"], rows)


def report(results: Results, quick: bool, load_at_start: float) -> str:
    names = list(results.rounds)
    headers = [
        "step",
        *names,
        "layerfs ÷ kernel overlayfs",
        "layerfs ÷ fuse-overlayfs",
        "kernel ÷ fuse-overlayfs",
    ]
    rows = []
    for step in STEPS:
        cells = [step] + [f"{results.median(n, step) * 1000:.1f} ms" for n in names]
        lfs = results.median("layerfs", step)
        kov = results.median("kernel overlayfs", step)
        fov = results.median("fuse-overlayfs", step)
        cells += [ratio_text(lfs, kov), ratio_text(lfs, fov), ratio_text(kov, fov)]
        rows.append(cells)
    note = (
        'The overlays\' "commit" row is the time to tar their upper directory (they have '
        "no commit of their own), shown for scale only."
    )
    size = "1 GB file reduced to 128 MB (--quick)" if quick else "as specified"
    fill = f"{results.cache_fill:.1f} s" if results.cache_fill is not None else "n/a"
    spread = "; ".join(
        f"{name}: " + ", ".join(f"{step} {results.spread(name, step)}" for step in STEPS)
        for name in names
    )
    return "\n".join(
        [
            "## Writable mounts: layerfs vs fuse-overlayfs vs kernel overlayfs",
            "",
            f"Command: `{command_line()}`  ",
            f"Machine: {environment_summary(load_at_start)}  ",
            f"Rounds: {len(next(iter(results.rounds.values())))} per system, median shown; "
            f"caches dropped before every step; sizes {size}. Each round mounts the image "
            "afresh with an empty upper directory: layerfs with `layerfs mount IMAGE DIR "
            "--upper U` (a kernel overlay: read-only it is "
            f"`{results.layers}`, writable `upperdir=U/upper,workdir=U/work` on top), the "
            "overlays over Docker's overlay2 layer dirs. layerfs's content cache was filled "
            f"before the rounds ({fill} from a first mount until every file's content was in "
            "it) and stays full for all of them.",
            "",
            markdown_table(headers, rows),
            "",
            note,
            "",
            f"Spread (min–max, ms): {spread}.",
            "",
            f"layerfs's mount log (`STORE/cache/logs/mount.log`): {results.mount_log}.",
            "",
            "Targets (layerfs, the content cache full):",
            "",
            targets_table(results),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    compile_bytecode()
    require_root()
    require_tools("fuse-overlayfs", "fio", "docker")
    tag = ensure_image(args.quick)
    work = WORK_DIR / "writable"
    force_unmount_under(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "store"
    say("importing the image into layerfs")
    run([*LAYERFS, "--store", str(store), "import", "--from-docker", tag])
    tree_tar = untar_source(work / "tree5000.tar")
    results = Results()
    systems = overlay_systems(tag, store)
    try:
        say("filling layerfs's content cache")
        results.cache_fill, results.layers = warm_content_cache(tag, store, work)
        for i in range(1 if args.quick else args.rounds):
            for system in systems:
                base = work / f"{system.name.replace(' ', '-')}-{i}"
                mnt = work / f"mnt-{i}"
                base.mkdir()
                mnt.mkdir(exist_ok=True)
                say(f"round {i + 1}: {system.name}")
                results.rounds.setdefault(system.name, []).append(
                    one_round(system, base, mnt, tree_tar)
                )
                shutil.rmtree(base, ignore_errors=True)
    finally:
        force_unmount_under(work)
        stop_views(store)
    results.mount_log = mount_log_summary(store, WORK_DIR / "logs" / "writable-mount.log")
    text = report(results, args.quick, load_at_start)
    print(text)
    print(json.dumps(results.rounds, indent=1))
    if not args.no_write:
        write_section("writable", text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        raise SystemExit(f"bench_writable: {exc}") from None

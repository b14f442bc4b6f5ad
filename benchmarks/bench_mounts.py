"""Many layerfs mounts at once: the memory of the processes serving them, and mount times.

A layerfs image mount is a kernel overlay over the image's view, served by a
FUSE daemon that outlives the mount command and is shared by every mount of
the image (and, in the current design, of every image of the store), and the
store's content cache. Two cases, on one store:

* 50 writable mounts of one image (``layerfs mount IMAGE DIR --upper U``, each
  with its own U);
* 10 different images mounted writable, one mount each.

Each mount is timed from the CLI and classed by what it found: no view daemon
running (the mount starts one), a daemon running but the image not mounted
yet, or the image mounted already (a second mount). Once all are mounted,
and again after `find` on every mount and `tar cf - . | wc -c` on one mount of
each image, the resident memory of the layerfs processes serving them (the
view daemons: their pids come from the views' records) is summed: RSS, PSS
(``/proc/PID/smaps_rollup``: pages shared between processes split among them)
and each process's peak (VmHWM). The images' indexes are built and their
contents cached by a mount before the timed ones, as they stay on disk.

The one image is ``bench/readonly:full`` (Debian minbase plus a 100 MiB file,
built by benchmarks.bench_readonly if missing); the ten are small ``docker
build`` layers (a few hundred files each) on the Debian base that benchmark uses
(on the busybox base with ``--quick``), imported with ``layerfs import
--from-docker``. Results go to the ``<!-- mounts -->`` section of
benchmarks/RESULTS.md. Run as root from the repository root:

    .venv/bin/python -m benchmarks.bench_mounts
    .venv/bin/python -m benchmarks.bench_mounts --quick   # 5 mounts, 3 images, busybox
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import bench_readonly
from benchmarks.bench_readonly import ensure_debian_base, image_id
from benchmarks.common import (
    WORK_DIR,
    BenchError,
    command_line,
    compile_bytecode,
    drop_caches,
    environment_summary,
    force_unmount_under,
    human_bytes,
    markdown_table,
    require_root,
    require_tools,
    run,
    wait_mounted,
    write_section,
)
from benchmarks.layerfs_views import (
    Memory,
    memory_of,
    mount_log_summary,
    pids_by_mountpoint,
    stop_views,
    view_of,
    view_pids,
    wait_content_cached,
    wait_gone,
)

SECTION = "mounts"
LAYERFS = [str(Path(sys.executable).with_name("layerfs"))]  # the venv's entry point
SMALL_PREFIX = "bench/mounts"
# One small layer per image, different in each (the image's number seeds sizes and names).
SMALL_DOCKERFILE = """\
FROM {base}
RUN set -e; mkdir -p /app/{n}; i=0; while [ $i -lt {files} ]; do \\
      head -c $(( (i * 37 + {n} * 101) % 20000 + 1 )) /dev/urandom > /app/{n}/f$i; \\
      i=$((i + 1)); done; \\
    echo "image {n}" > /etc/bench-image
"""
STARTS_DAEMON = "starts a view daemon"
NEW_IMAGE = "first mount of an image, its view daemon running"
SECOND_MOUNT = "another mount of a mounted image"
KINDS = [STARTS_DAEMON, NEW_IMAGE, SECOND_MOUNT]
MEMORY_TARGETS = {"one image": 100 << 20, "different images": 150 << 20}
MOUNT_TARGET, SECOND_MOUNT_TARGET = 0.3, 0.1


def say(msg: str) -> None:
    print(f"[bench_mounts] {msg}", file=sys.stderr, flush=True)


# -- images --------------------------------------------------------------------------


def ensure_small_images(count: int, quick: bool, work: Path) -> list[str]:
    """``count`` small images, each one distinct layer on the base; return their tags."""
    from tests.support.dockerenv import docker_build, ensure_busybox_image, ensure_dockerd

    if quick:
        base, variant = ensure_busybox_image(ensure_dockerd()), "busybox"
    else:
        base, variant = ensure_debian_base(work), "bookworm"
    tags = []
    for n in range(count):
        tag = f"{SMALL_PREFIX}-{n}:{variant}"
        tags.append(tag)
        if image_id(tag):
            continue
        ctx = work / "context"
        shutil.rmtree(ctx, ignore_errors=True)
        ctx.mkdir(parents=True)
        (ctx / "Dockerfile").write_text(SMALL_DOCKERFILE.format(base=base, n=n, files=300))
        say(f"building {tag}")
        try:
            docker_build(ctx, tag)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from exc
        finally:
            shutil.rmtree(ctx, ignore_errors=True)
    return tags


# -- mounting ------------------------------------------------------------------------


@dataclass
class Mounts:
    """Writable layerfs mounts made in one case, and what they cost."""

    store: Path
    root: Path  # mountpoints and upper dirs live below
    points: list[Path] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # the image of each mountpoint
    seconds: list[float] = field(default_factory=list)  # each mount, from the CLI
    kinds: list[str] = field(default_factory=list)  # what each mount found (KINDS)

    def mount(self, image: str) -> float:
        n = len(self.points)
        mnt, upper = self.root / f"mnt{n}", self.root / f"upper{n}"
        mnt.mkdir(parents=True)
        daemons = {view_of(p).pid for p in self.points}
        start = time.perf_counter()
        run([*LAYERFS, "--store", str(self.store), "mount", image, str(mnt), "--upper", str(upper)])
        wait_mounted(mnt)
        os.stat(mnt)
        seconds = time.perf_counter() - start
        if view_of(mnt).pid not in daemons:
            kind = STARTS_DAEMON
        elif image in self.images:
            kind = SECOND_MOUNT
        else:
            kind = NEW_IMAGE
        self.points.append(mnt)
        self.images.append(image)
        self.seconds.append(seconds)
        self.kinds.append(kind)
        return seconds

    def unmount_all(self) -> None:
        """Unmount every mount (the views stop with the last mount over them)."""
        daemons = view_pids(self.points) if self.points else []
        for mnt in reversed(self.points):
            run([*LAYERFS, "--store", str(self.store), "umount", str(mnt)])
        wait_gone(daemons)
        self.points.clear()


def prepare(store: Path, images: list[str], root: Path) -> float:
    """Mount each image once (its index built, if its import did not) and fill the
    content cache; unmount. Returns the longest first mount."""
    mounts = Mounts(store, root)
    try:
        for image in images:
            mounts.mount(image)
        for mnt in mounts.points:
            wait_content_cached(mnt)
        return max(mounts.seconds)
    finally:
        mounts.unmount_all()
        shutil.rmtree(root, ignore_errors=True)


def exercise(mounts: Mounts) -> None:
    """`find` on every mount, `tar cf - . | wc -c` on one mount of each image."""
    tarred: set[str] = set()
    for mnt, image in zip(mounts.points, mounts.images, strict=True):
        run(["find", str(mnt)])
        if image not in tarred:
            tarred.add(image)
            run(["/bin/sh", "-c", f"tar -C {mnt} -cf - . | wc -c"])


@dataclass
class Case:
    """The figures of one case: mounts, their processes and memory, mount times."""

    name: str
    mounts: int
    images: int
    seconds: dict[str, list[float]]  # each mount's time, by what it found (KINDS)
    after_mount: Memory
    after_use: Memory
    pids: list[int]
    same_by_mountpoint: bool  # the pids found by mountpoint argument agree
    per_process_pss: list[int]
    limit: int


def run_case(name: str, store: Path, images: list[str], root: Path) -> Case:
    """Mount ``images`` (one mount each, in order), measure, exercise, measure, unmount."""
    say(f"{name}: preparing (index, content cache)")
    prepare(store, sorted(set(images)), root / "prepare")
    drop_caches()
    mounts = Mounts(store, root / "case")
    try:
        say(f"{name}: {len(images)} mounts")
        for image in images:
            mounts.mount(image)
        seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for kind, value in zip(mounts.kinds, mounts.seconds, strict=True):
            seconds[kind].append(value)
        for mnt in mounts.points:
            wait_content_cached(mnt)  # no fill runs while memory is read
        pids = view_pids(mounts.points)
        after_mount = memory_of(pids)
        exercise(mounts)
        after_use = memory_of(pids)
        by_arg = pids_by_mountpoint(mounts.points)
        per_process = [memory_of([p]).pss for p in pids]
        return Case(
            name=name,
            mounts=len(images),
            images=len(set(images)),
            seconds=seconds,
            after_mount=after_mount,
            after_use=after_use,
            pids=pids,
            same_by_mountpoint=set(by_arg) <= set(pids),
            per_process_pss=per_process,
            limit=MEMORY_TARGETS[name],
        )
    finally:
        mounts.unmount_all()
        shutil.rmtree(root / "case", ignore_errors=True)


# -- report --------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def secs(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f} s"
    return (
        f"{statistics.median(values):.3f} s (median of {len(values)}; "
        f"{min(values):.3f}–{max(values):.3f})"
    )


def memory_table(cases: list[Case]) -> str:
    rows = []
    for case in cases:
        for when, mem in (("after mounting", case.after_mount), ("after use", case.after_use)):
            rows.append(
                [
                    f"{case.mounts} mounts of {case.images} image(s)",
                    when,
                    str(mem.processes),
                    mib(mem.rss),
                    mib(mem.pss),
                    mib(mem.peak_rss),
                ]
            )
    headers = ["case", "when", "layerfs processes", "RSS (sum)", "PSS (sum)", "peak RSS (sum)"]
    return markdown_table(headers, rows)


def mount_table(cases: list[Case], index_mount: float) -> str:
    rows = [["first mount after import (the import built the image's index)", secs([index_mount])]]
    for case in cases:
        label = f"{case.mounts} mounts of {case.images} image(s)"
        for kind in KINDS:
            if case.seconds[kind]:
                rows.append([f"{label}: {kind}", secs(case.seconds[kind])])
    return markdown_table(["mount (from the CLI)", "seconds"], rows)


def targets_table(cases: list[Case]) -> str:
    rows = []
    for case in cases:
        value = case.after_use.pss
        rows.append(
            [
                f"{case.mounts} writable mounts of {case.images} image(s): layerfs PSS in all",
                f"≤ {human_bytes(case.limit)}",
                mib(value),
                "met" if value <= case.limit else "**missed**",
            ]
        )
    firsts = [s for c in cases for k in (STARTS_DAEMON, NEW_IMAGE) for s in c.seconds[k]]
    laters = [s for c in cases for s in c.seconds[SECOND_MOUNT]]
    for label, values, limit in (
        ("mount of an image not mounted yet (median over both cases)", firsts, MOUNT_TARGET),
        ("another mount of a mounted image (median)", laters, SECOND_MOUNT_TARGET),
    ):
        if values:
            value = statistics.median(values)
            verdict = "met" if value <= limit else "**missed**"
            rows.append([label, f"≤ {limit:g} s", f"{value:.3f} s", verdict])
    return markdown_table(["target", "limit", "layerfs", "verdict"], rows)


def report(
    cases: list[Case],
    index_mount: float,
    big_tag: str,
    small: list[str],
    load: float,
    log_note: str,
) -> str:
    notes = []
    for case in cases:
        per = case.per_process_pss
        spread = f"{mib(min(per))}–{mib(max(per))}" if per else "n/a"
        notes.append(
            f"- {case.mounts} mounts of {case.images} image(s): view daemon pid(s) "
            f"{', '.join(map(str, case.pids))}; PSS of each after use {spread}; the processes "
            "found by the mountpoints in their command lines are "
            + ("among them" if case.same_by_mountpoint else "**not all among them**")
            + "."
        )
    return "\n\n".join(
        [
            "## Many mounts: memory of the layerfs processes serving them, mount times",
            f"Command: `{command_line()}` (as root, from the repository root).\n"
            f"Machine: {environment_summary(load)}.",
            f"- One image: `{big_tag}`, mounted {cases[0].mounts} times, each writable with its "
            f"own upper dir (`layerfs mount IMAGE DIR --upper U`). Different images: "
            f"{len(small)} images `{small[0]}` … `{small[-1]}` (the "
            + ("busybox" if small[0].endswith(":busybox") else "Debian minbase")
            + " base plus one layer of 300 small files each), one writable mount each. All"
            " in one store.\n"
            "- Memory: the view daemons serving the mounts (pids from the views' records; "
            "the `layerfs mount` commands exit once mounted), summed over them: RSS, PSS "
            '(`/proc/PID/smaps_rollup`) and peak RSS (VmHWM). "After use": after `find` on '
            "every mount and `tar cf - . | wc -c` on one mount of each image. The targets are "
            "judged on PSS after use.\n"
            "- Before the timed mounts each image was mounted once (building its index and "
            "filling the content cache, both kept on disk) and unmounted; caches dropped "
            "before the first timed mount.",
            memory_table(cases),
            mount_table(cases, index_mount),
            "Targets:\n\n" + targets_table(cases),
            "\n".join(notes),
            f"The store's mount log (`STORE/cache/logs/mount.log`): {log_note}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 mounts, 3 images, busybox")
    parser.add_argument("--mounts", type=int, default=None, help="mounts of one image (50)")
    parser.add_argument("--images", type=int, default=None, help="different images (10)")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    compile_bytecode()
    require_root()
    require_tools("docker", "find", "tar")
    n_mounts = args.mounts or (5 if args.quick else 50)
    n_images = args.images or (3 if args.quick else 10)
    work = WORK_DIR / "mounts"
    force_unmount_under(work)
    shutil.rmtree(work / "store", ignore_errors=True)
    shutil.rmtree(work / "cases", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    spec = bench_readonly.QUICK if args.quick else bench_readonly.FULL
    big_tag = bench_readonly.ensure_image(spec, WORK_DIR / "readonly")
    small = ensure_small_images(n_images, args.quick, WORK_DIR / "readonly")
    store = work / "store"
    say(f"importing {1 + len(small)} images")
    for tag in [big_tag, *small]:
        run([*LAYERFS, "--store", str(store), "import", "--from-docker", tag])
    cases: list[Case] = []
    try:
        say("first mount after import")
        index_mount = prepare(store, [big_tag], work / "cases" / "index")
        cases.append(run_case("one image", store, [big_tag] * n_mounts, work / "cases" / "one"))
        cases.append(run_case("different images", store, small, work / "cases" / "many"))
    finally:
        force_unmount_under(work)
        stop_views(store)
    log_note = mount_log_summary(store, WORK_DIR / "logs" / "mounts-mount.log")
    text = report(cases, index_mount, big_tag, small, load_at_start, log_note)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        raise SystemExit(f"bench_mounts: {exc}") from None

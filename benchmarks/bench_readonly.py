"""Read-only benchmark: layerfs vs fuse-overlayfs vs kernel overlayfs on one image.

Builds (once, then cached) a Debian minbase image plus layers that delete, replace
and add files, including one large random file; then, side by side on the same
image: mount time (and of a second mount while one is mounted), cold `find`, cold
and warm `tar cf - . | wc -c`, cold and warm sequential read of the large file,
peak RSS of the process serving the mount, and `layerfs import` vs `docker load`
into an empty second daemon, with the bytes each stores. The overlay mounts use
the daemon's own overlay2 layer directories read-only (lowerdir=UPPER:LOWER...,
no upperdir).

A layerfs mount is a kernel overlay over the image's view (a FUSE daemon shared
by every mount of the image) and the store's content cache, which the view fills
in the background when the import has not (`layerfs import` writes the bytes it
reads into the cache). layerfs is measured with that cache full, as it stays on
disk once filled; the first read after import (on the first mount of the
imported store), a read with the cache evicted and the time the view takes to
fill the cache are figures of their own. The report also sets the content
cache's disk use beside Docker's overlay2 directories.

"Cold" means a fresh mount and dropped kernel caches before each sample, so FUSE
daemons start without their userspace caches too. Every timing is the median of a
few samples, taken in rounds: each round samples one figure on every system in turn,
so that a change in the machine's speed during the run moves all systems alike.
Results go to the ``<!-- readonly -->`` section of benchmarks/RESULTS.md.

Run from the repository root as root:
    .venv/bin/python -m benchmarks.bench_readonly          # full run
    .venv/bin/python -m benchmarks.bench_readonly --quick  # small smoke run
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from benchmarks.common import (
    WORK_DIR,
    BenchError,
    Samples,
    command_line,
    compile_bytecode,
    drop_caches,
    environment_summary,
    force_unmount_under,
    human_bytes,
    markdown_table,
    peak_rss_bytes,
    require_root,
    require_tools,
    run,
    time_call,
    time_warm,
    tree_size,
    wait_mounted,
    write_section,
)
from benchmarks.layerfs_views import (
    cache_allocated,
    content_cache_root,
    mount_layers,
    mount_log_summary,
    pids_by_mountpoint,
    stop_views,
    view_pids,
    wait_content_cached,
    wait_gone,
)
from tests.support.debian import DEBIAN_IMAGE, ensure_debian_image, image_id
from tests.support.private_dockerd import PrivateDockerd

PREFIX = "bench"
SECTION = "readonly"
BASE_TAG = DEBIAN_IMAGE
LAYERFS = [str(Path(sys.executable).with_name("layerfs"))]  # the venv's entry point


# -- the image ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """What to build: the tag, the base image and the size of the large file."""

    tag: str
    big_mb: int
    quick: bool

    @property
    def big_path(self) -> str:
        return "opt/bench/big.bin"


FULL = ImageSpec(tag=f"{PREFIX}/readonly:full", big_mb=100, quick=False)
QUICK = ImageSpec(tag=f"{PREFIX}/readonly:quick", big_mb=16, quick=True)

# Layers on top of the base: deletions (whiteouts, an opaque directory),
# replacements of content and of metadata only, then the large file and a tree
# of small files (half of them copies of existing content).
DOCKERFILE = """\
FROM {base}
RUN rm -rf /var/cache/apt/archives/*.deb /var/lib/apt/lists/* /usr/share/doc/* \\
 && rm -rf /usr/share/locale && mkdir -p /usr/share/locale/C \\
 && rm -f /etc/motd /usr/bin/xargs
RUN echo 'PRETTY_NAME="layerfs read-only benchmark"' > /etc/os-release \\
 && cp /bin/ls /usr/bin/xargs && chmod 640 /etc/group && chmod 4755 /usr/bin/xargs \\
 && echo 'bench:x:1000:1000::/home/bench:/bin/sh' >> /etc/passwd && mkdir -p /home/bench
RUN set -e; mkdir -p /opt/bench/small; \\
    head -c $(({big_mb} * 1048576)) /dev/urandom > /{big_path}; \\
    i=0; while [ $i -lt {small} ]; do \\
      head -c $((i * 7 % 9000 + 1)) /dev/urandom > /opt/bench/small/f$i; i=$((i + 1)); done; \\
    cp -a {copy_dir} /opt/bench/copy; \\
    ln /opt/bench/small/f1 /opt/bench/hardlink
"""


def ensure_debian_base(work: Path) -> str:
    """`debootstrap --variant=minbase bookworm` imported into the daemon (once; shared
    with the tests)."""
    if not image_id(BASE_TAG):
        say("debootstrap minbase bookworm (about a minute)")
    try:
        return ensure_debian_image(BASE_TAG)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def ensure_image(spec: ImageSpec, work: Path) -> str:
    """Build the benchmark image unless it exists; return its tag."""
    if image_id(spec.tag):
        return spec.tag
    if spec.quick:
        from tests.support.dockerenv import ensure_busybox_image, ensure_dockerd

        base = ensure_busybox_image(ensure_dockerd())
        small, copy_dir = 300, "/bin"
    else:
        base = ensure_debian_base(work)
        small, copy_dir = 800, "/usr/share/zoneinfo/America"
    ctx = work / "context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(
        DOCKERFILE.format(
            base=base,
            big_mb=spec.big_mb,
            big_path=spec.big_path,
            small=small,
            copy_dir=copy_dir,
        )
    )
    say(f"building {spec.tag}")
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    proc = subprocess.run(
        ["docker", "build", "-q", "-t", spec.tag, str(ctx)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise BenchError(f"docker build of {spec.tag} failed: {proc.stderr.strip()[-2000:]}")
    shutil.rmtree(ctx, ignore_errors=True)
    return spec.tag


def ensure_archive(tag: str, work: Path) -> Path:
    """`docker save` of the image, cached next to a file naming the image id it came from."""
    archive = work / (tag.replace("/", "_").replace(":", "_") + ".tar")
    stamp = archive.with_suffix(".id")
    current = image_id(tag)
    if archive.exists() and stamp.exists() and stamp.read_text() == current:
        return archive
    say(f"docker save {tag}")
    run(["docker", "save", "-o", str(archive), tag])
    stamp.write_text(current or "")
    return archive


def overlay_dirs(tag: str) -> list[str]:
    """The image's overlay2 layer dirs (GraphDriver.Data UpperDir, then LowerDir), top first."""
    out = run(["docker", "image", "inspect", "-f", "{{json .GraphDriver}}", tag]).stdout
    driver = json.loads(out)
    if driver.get("Name") != "overlay2":
        raise BenchError(f"the Docker storage driver is {driver.get('Name')}, not overlay2")
    data = driver["Data"]
    return [data["UpperDir"]] + [d for d in data.get("LowerDir", "").split(":") if d]


def overlay_lowerdirs(tag: str) -> str:
    """The image's overlay2 layer dirs as a read-only lowerdir= value (top first)."""
    return ":".join(overlay_dirs(tag))


def count_entries(root: Path) -> int:
    """Entries below a mounted tree (a sanity check: every system should agree)."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


# -- the systems under test -------------------------------------------------------------


@dataclass
class System:
    """One way of mounting the image read-only."""

    name: str
    mount_cmd: Callable[[Path], list[str]]
    umount_cmd: Callable[[Path], list[str]]
    fuse: bool = True
    store: Path | None = None  # layerfs: the store whose content cache the mounts read

    def mount(self, mnt: Path) -> float:
        """Mount; return seconds until the mountpoint answers."""
        start = time.perf_counter()
        run(self.mount_cmd(mnt))
        wait_mounted(mnt)
        os.stat(mnt)
        return time.perf_counter() - start

    def daemons(self, mnt: Path) -> list[int]:
        """The processes serving the mount at ``mnt``: layerfs's image view (found from
        its record), fuse-overlayfs's daemon (by its mountpoint argument), or none."""
        if self.store is not None:
            return view_pids([mnt])
        return pids_by_mountpoint([mnt]) if self.fuse else []

    def umount(self, mnt: Path, last: bool = True) -> None:
        """Unmount; unless another mount shares its daemon (``last`` False), wait for the
        daemon to exit before the next sample."""
        daemons = self.daemons(mnt) if last else []
        run(self.umount_cmd(mnt))
        wait_gone(daemons)


def kernel_overlay(lowerdirs: str) -> System:
    return System(
        "kernel overlayfs",
        lambda m: ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdirs}", str(m)],
        lambda m: ["umount", str(m)],
        fuse=False,
    )


def fuse_overlayfs(lowerdirs: str) -> System:
    return System(
        "fuse-overlayfs",
        lambda m: ["fuse-overlayfs", "-o", f"lowerdir={lowerdirs}", str(m)],
        lambda m: ["fusermount3", "-u", str(m)],
    )


def layerfs(store: Path, tag: str) -> System:
    return System(
        "layerfs",
        lambda m: [*LAYERFS, "--store", str(store), "mount", tag, str(m)],
        lambda m: [*LAYERFS, "--store", str(store), "umount", str(m)],
        store=store,
    )


def layerfs_available() -> bool:
    proc = subprocess.run([*LAYERFS, "--help"], capture_output=True, text=True)
    commands = proc.stdout.split("Commands:")[-1].split()
    return all(c in commands for c in ("import", "mount", "umount"))


# -- measurements ----------------------------------------------------------------------


@dataclass
class Figures:
    """Everything measured for one system (seconds, bytes)."""

    first_mount: float = float("nan")
    first_read: float = float("nan")  # the big file's cold read on the first mount
    mount: Samples = field(default_factory=Samples)
    second_mount: Samples = field(default_factory=Samples)  # while one mount stays
    cold_find: Samples = field(default_factory=Samples)
    cold_tar: Samples = field(default_factory=Samples)
    warm_tar: Samples = field(default_factory=Samples)
    cold_read: Samples = field(default_factory=Samples)
    warm_read: Samples = field(default_factory=Samples)
    # layerfs only: the big file's cold read with the content cache evicted, the time
    # from a mount with an empty cache until every file is in it, and its disk use
    empty_cache_read: Samples = field(default_factory=Samples)
    cache_fill: float | None = None
    cache_bytes: int | None = None
    layers: str = ""  # layerfs: the overlay's layers, as mounted
    mount_log: str = ""  # layerfs: what the store's mount log says
    peak_rss: int | None = None
    daemon_pids: str = ""  # how the processes behind peak_rss were found
    tar_bytes: int = 0
    entries: int = 0
    warm_lost: int = 0  # warm samples retaken because someone dropped the page cache


def tar_bytes(root: Path) -> int:
    """Run `tar cf - . | wc -c` in ``root``; return the byte count."""
    proc = subprocess.run(
        ["/bin/sh", "-c", "tar cf - . | wc -c"], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise BenchError(f"tar in {root} failed: {proc.stderr.strip()}")
    return int(proc.stdout.split()[0])


def read_file(path: Path) -> None:
    run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])


def find_tree(root: Path) -> None:
    run(["find", str(root)])


def measure_empty_cache(system: System, mnt: Path, big: str, reps: int, fig: Figures) -> None:
    """layerfs with its content cache evicted (an import fills it; `--no-cache` or eviction
    leave it empty): the big file's cold read, then how long the view takes to fill the
    cache. Leaves the cache full."""
    assert system.store is not None
    cache = content_cache_root(system.store)
    for _ in range(reps):
        shutil.rmtree(cache, ignore_errors=True)  # nothing is mounted: no view uses it
        system.mount(mnt)
        drop_caches()
        fig.empty_cache_read.add(time_call(lambda: read_file(mnt / big)))
        system.umount(mnt)
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    start = time.perf_counter()
    system.mount(mnt)
    wait_content_cached(mnt)
    fig.cache_fill = time.perf_counter() - start
    fig.cache_bytes = cache_allocated(system.store)
    system.umount(mnt)


def _second(mnt: Path) -> Path:
    """Where a system's second mount goes, beside its first at ``mnt``."""
    return mnt.with_name(mnt.name + "-second")


def measure_all(systems: list[System], mnt_root: Path, big: str, reps: int) -> dict[str, Figures]:
    """All figures of every system, their samples interleaved; leaves nothing mounted.

    Each repeated figure is sampled system after system within one round, so that a
    change in the machine's speed during the run (other load on the host) moves every
    system's samples alike, not only those of whichever system was measured then.
    For layerfs, every figure but the first mount's and the empty-cache ones is taken
    with the content cache full (measure_empty_cache fills it and checks that every
    file is in it).
    """
    figs = {s.name: Figures() for s in systems}
    mnts = {}
    for i, system in enumerate(systems):
        mnt = mnt_root.with_name(f"{mnt_root.name}-{i}")
        mnt.mkdir(parents=True, exist_ok=True)
        _second(mnt).mkdir(exist_ok=True)
        mnts[system.name] = mnt
    try:
        for system in systems:
            fig, mnt = figs[system.name], mnts[system.name]
            fig.first_mount = system.mount(mnt)  # layerfs: the store as its import left it
            drop_caches()
            fig.first_read = time_call(lambda m=mnt: read_file(m / big))
            fig.entries = count_entries(mnt)
            if system.store is not None:
                fig.layers = mount_layers(mnt, system.store)
            system.umount(mnt)
            if system.store is not None:
                measure_empty_cache(system, mnt, big, reps, fig)

        def rounds(sample: Callable[[System, Figures, Path], None]) -> None:
            for _ in range(reps):
                for system in systems:
                    sample(system, figs[system.name], mnts[system.name])

        def mount_sample(system: System, fig: Figures, mnt: Path) -> None:
            fig.mount.add(system.mount(mnt))
            system.umount(mnt)

        def second_sample(system: System, fig: Figures, mnt: Path) -> None:
            mnt2 = _second(mnt)
            system.mount(mnt)
            fig.second_mount.add(system.mount(mnt2))
            system.umount(mnt2, last=system.store is None)
            system.umount(mnt)

        def cold(samples: Callable[[Figures], Samples], action: Callable[[Path], object]):
            def sample(system: System, fig: Figures, mnt: Path) -> None:
                system.mount(mnt)
                drop_caches()
                samples(fig).add(time_call(lambda: action(mnt)))
                system.umount(mnt)

            return sample

        rounds(mount_sample)
        rounds(second_sample)
        rounds(cold(lambda f: f.cold_find, find_tree))
        rounds(cold(lambda f: f.cold_tar, tar_bytes))
        rounds(cold(lambda f: f.cold_read, lambda m: read_file(m / big)))

        # Every system mounted once for the warm figures, their samples interleaved;
        # each daemon's peak RSS covers all of them.
        for system in systems:
            mnt = mnts[system.name]
            system.mount(mnt)
            find_tree(mnt)
            figs[system.name].tar_bytes = tar_bytes(mnt)
        for samples, action in (
            (lambda f: f.warm_tar, tar_bytes),
            (lambda f: f.warm_read, lambda m: read_file(m / big)),
        ):
            for system in systems:
                action(mnts[system.name])

            def warm(system: System, fig: Figures, mnt: Path, action=action, samples=samples):
                seconds, lost = time_warm(lambda: action(mnt))
                samples(fig).add(seconds)
                fig.warm_lost += lost

            rounds(warm)
        for system in systems:
            fig, mnt = figs[system.name], mnts[system.name]
            if system.fuse:
                pids = system.daemons(mnt)
                fig.peak_rss = peak_rss_bytes(pids)
                by_arg = pids_by_mountpoint([mnt])
                fig.daemon_pids = f"{len(pids)} process(es)" + (
                    ", the same found by the mountpoint argument"
                    if by_arg == pids
                    else f"; by the mountpoint argument: {len(by_arg)} ({by_arg} vs {pids})"
                )
            system.umount(mnt)
    finally:
        for mnt in mnts.values():
            force_unmount_under(mnt)
            force_unmount_under(_second(mnt))
    return figs


@dataclass
class ImportFigures:
    layerfs: Samples = field(default_factory=Samples)
    docker_load: Samples = field(default_factory=Samples)
    layerfs_bytes: int | None = None
    layerfs_allocated: int | None = None
    docker_bytes: int | None = None
    docker_allocated: int | None = None


def import_into_layerfs(archive: Path, store: Path, tag: str) -> float:
    shutil.rmtree(store, ignore_errors=True)
    drop_caches()
    return time_call(
        lambda: run([*LAYERFS, "--store", str(store), "import", str(archive), "--tag", tag])
    )


def measure_imports(
    archive: Path, tag: str, work: Path, reps: int, with_layerfs: bool
) -> tuple[ImportFigures, Path]:
    """layerfs import vs docker load into an empty daemon; the last store stays for mounts."""
    figs = ImportFigures()
    store = work / "store"
    if with_layerfs:
        for _ in range(reps):
            figs.layerfs.add(import_into_layerfs(archive, store, tag))
        size = tree_size(store)
        figs.layerfs_bytes, figs.layerfs_allocated = size.apparent, size.allocated
    daemon = PrivateDockerd().start()
    try:
        for i in range(reps):
            if i:
                daemon.reset()
            drop_caches()
            figs.docker_load.add(
                time_call(lambda: daemon.docker("load", "-q", "-i", str(archive), timeout=900))
            )
        size = tree_size(daemon.data_root)
        figs.docker_bytes, figs.docker_allocated = size.apparent, size.allocated
    finally:
        daemon.destroy()
    return figs, store


# -- report ------------------------------------------------------------------------------

NA = "n/a"


def known(x: float | None) -> bool:
    return x is not None and x == x  # NaN marks a figure that was not measured


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if known(a) and known(b) and b else None


def fmt_ratio(x: float | None) -> str:
    return f"{x:.2f}×" if known(x) else NA


def fmt_secs(x: float | None) -> str:
    return f"{x:.3f} s" if known(x) else NA


def fmt_bytes(x: float | None) -> str:
    return human_bytes(x) if known(x) and x else NA


def figure_getters(
    spec: ImageSpec, first_mount: str
) -> list[tuple[str, Callable[[Figures], float | None], Callable]]:
    """(label, getter, formatter) of each figure a table shows."""
    return [
        (first_mount, lambda f: f.first_mount, fmt_secs),
        (
            f"cold read of the {spec.big_mb} MiB file on that first mount",
            lambda f: f.first_read,
            fmt_secs,
        ),
        ("mount", lambda f: f.mount.median, fmt_secs),
        ("second mount while one is mounted", lambda f: f.second_mount.median, fmt_secs),
        ("cold find", lambda f: f.cold_find.median, fmt_secs),
        ("cold tar \\| wc -c", lambda f: f.cold_tar.median, fmt_secs),
        ("warm tar \\| wc -c", lambda f: f.warm_tar.median, fmt_secs),
        (f"cold read of the {spec.big_mb} MiB file", lambda f: f.cold_read.median, fmt_secs),
        (f"warm read of the {spec.big_mb} MiB file", lambda f: f.warm_read.median, fmt_secs),
        ("peak RSS of the mount daemon", lambda f: f.peak_rss, fmt_bytes),
    ]


NAMES = ["layerfs", "fuse-overlayfs", "kernel overlayfs"]


def overlay_table(figs: dict[str, Figures], spec: ImageSpec) -> str:
    """Raw figures of each system and their ratios to kernel overlayfs and fuse-overlayfs."""
    cols = [figs.get(n) for n in NAMES]
    big = spec.big_mb << 20
    rows = []

    def row(label: str, vals: list[float | None], fmt: Callable) -> list[str]:
        lfs, fov, kov = vals
        return [
            label,
            *(fmt(v) for v in vals),
            fmt_ratio(ratio(lfs, kov)),
            fmt_ratio(ratio(lfs, fov)),
            fmt_ratio(ratio(kov, fov)),
        ]

    for label, get, fmt in figure_getters(spec, "first mount after import"):
        rows.append(row(label, [get(f) if f else None for f in cols], fmt))
    lfs = cols[0]
    if lfs is not None:
        # the peers have no content cache: their ratios are to their own cold read
        first = lfs.empty_cache_read.median
        vals = [first, *(f.cold_read.median if f else None for f in cols[1:])]
        rows.append(
            row(
                f"cold read of the {spec.big_mb} MiB file, layerfs's content cache evicted "
                "(peers: their cold read)",
                vals,
                fmt_secs,
            )
        )
    speeds = [f"{big / f.cold_read.median / 2**20:.0f} MiB/s" if f else NA for f in cols]
    rows.append(["cold read throughput", *speeds, "", "", ""])
    headers = [
        "figure",
        *NAMES,
        "layerfs ÷ kernel overlayfs",
        "layerfs ÷ fuse-overlayfs",
        "kernel ÷ fuse-overlayfs",
    ]
    return markdown_table(headers, rows)


def import_table(imports: ImportFigures, archive_size: int) -> str:
    """layerfs import vs docker load: time and bytes stored."""
    lfs_t, dock_t = imports.layerfs.median, imports.docker_load.median
    rows = [
        ["time", fmt_secs(lfs_t), fmt_secs(dock_t), fmt_ratio(ratio(lfs_t, dock_t))],
        [
            "bytes stored (apparent)",
            fmt_bytes(imports.layerfs_bytes),
            fmt_bytes(imports.docker_bytes),
            fmt_ratio(ratio(imports.layerfs_bytes, imports.docker_bytes)),
        ],
        [
            "bytes stored (allocated)",
            fmt_bytes(imports.layerfs_allocated),
            fmt_bytes(imports.docker_allocated),
            fmt_ratio(ratio(imports.layerfs_allocated, imports.docker_allocated)),
        ],
        [
            f"stored ÷ archive ({human_bytes(archive_size)})",
            fmt_ratio(ratio(imports.layerfs_bytes, archive_size)),
            fmt_ratio(ratio(imports.docker_bytes, archive_size)),
            "",
        ],
    ]
    return markdown_table(
        ["figure", "layerfs import", "docker load (empty data root)", "layerfs ÷ docker"], rows
    )


@dataclass
class DiskUse:
    """Allocated bytes layerfs keeps for the image, beside Docker's overlay2 dirs of it."""

    packs: int  # STORE/packs: the image's data and tree records
    other_store: int  # the rest outside STORE/cache (documents, locks, keys)
    index: int  # STORE/cache/index: the image's index
    meta: int  # STORE/cache/meta: the image's metadata tree, if the mounts use one
    other_cache: int  # the rest of STORE/cache (logs)
    content_cache: int  # STORE/cache/content: every file's plain bytes
    docker: int  # the image's overlay2 layer dirs (GraphDriver UpperDir + LowerDir)
    docker_dirs: int


def disk_use(store: Path, tag: str) -> DiskUse:
    def allocated(path: Path) -> int:
        return tree_size(path).allocated if path.is_dir() else 0

    cache = allocated(store / "cache")
    content = allocated(content_cache_root(store))
    index, meta = allocated(store / "cache" / "index"), allocated(store / "cache" / "meta")
    packs = allocated(store / "packs")
    dirs = overlay_dirs(tag)
    return DiskUse(
        packs=packs,
        other_store=allocated(store) - cache - packs,
        index=index,
        meta=meta,
        other_cache=cache - content - index - meta,
        content_cache=content,
        docker=sum(tree_size(d).allocated for d in dirs),
        docker_dirs=len(dirs),
    )


def disk_table(use: DiskUse) -> str:
    """The content cache and the store beside Docker's overlay2 dirs, allocated bytes."""
    total = use.packs + use.other_store + use.index + use.meta + use.other_cache
    total += use.content_cache
    rows = [
        ["store packs (`STORE/packs`)", fmt_bytes(use.packs), "", ""],
        ["rest of the store (documents, keys)", fmt_bytes(use.other_store), "", ""],
        ["image index (`STORE/cache/index`)", fmt_bytes(use.index), "", ""],
        ["metadata tree (`STORE/cache/meta`)", fmt_bytes(use.meta) if use.meta else "none", "", ""],
        ["rest of the cache dir (logs)", fmt_bytes(use.other_cache), "", ""],
        [
            "content cache (`STORE/cache/content`)",
            fmt_bytes(use.content_cache),
            fmt_bytes(use.docker),
            fmt_ratio(ratio(use.content_cache, use.docker)),
        ],
        [
            "store packs + content cache",
            fmt_bytes(use.packs + use.content_cache),
            fmt_bytes(use.docker),
            fmt_ratio(ratio(use.packs + use.content_cache, use.docker)),
        ],
        ["all of it", fmt_bytes(total), fmt_bytes(use.docker), fmt_ratio(ratio(total, use.docker))],
    ]
    headers = [
        "disk use (allocated)",
        "layerfs",
        f"Docker overlay2 ({use.docker_dirs} layer dirs)",
        "layerfs ÷ Docker",
    ]
    return markdown_table(headers, rows)


def targets_table(figs: dict[str, Figures], spec: ImageSpec) -> str:
    """The issue's targets for layerfs, met or missed: ratios to kernel overlayfs over
    Docker's overlay2 dirs, to fuse-overlayfs, and the mount times."""
    lfs, fov, kov = (figs.get(n) for n in NAMES)
    if lfs is None:
        return "not measured (no layerfs)"
    big = f"the {spec.big_mb} MiB file"
    speed: list[tuple[str, Callable[[Figures], float], float]] = [
        ("cold find", lambda f: f.cold_find.median, 1.5),
        ("cold tar", lambda f: f.cold_tar.median, 1.5),
        ("warm tar", lambda f: f.warm_tar.median, 1.1),
        (f"cold read of {big}", lambda f: f.cold_read.median, 1.2),
    ]
    checks: list[tuple[str, float, float | None, Callable]] = []
    for label, get, limit in speed:
        checks.append((f"{label} ÷ kernel overlayfs", limit, ratio(get(lfs), get(kov)), fmt_ratio))
    checks.append(
        (
            f"first read after import: cold read of {big} on the first mount ÷ kernel"
            " overlayfs' cold read",
            3.0,
            ratio(lfs.first_read, kov.cold_read.median),
            fmt_ratio,
        )
    )
    checks.append(
        (
            f"cold read of {big} with the content cache evicted ÷ kernel overlayfs' cold read",
            3.0,
            ratio(lfs.empty_cache_read.median, kov.cold_read.median),
            fmt_ratio,
        )
    )
    for label, get, _ in speed:
        checks.append((f"{label} ÷ fuse-overlayfs", 1.0, ratio(get(lfs), get(fov)), fmt_ratio))
    checks.append(("mount (from the CLI)", 0.3, lfs.mount.median, fmt_secs))
    checks.append(("second mount while one is mounted", 0.1, lfs.second_mount.median, fmt_secs))
    rows = []
    for label, limit, value, fmt in checks:
        verdict = "not measured" if not known(value) else "met" if value <= limit else "**missed**"
        unit = " s" if fmt is fmt_secs else "×"
        rows.append([label, f"≤ {limit:g}{unit}", fmt(value), verdict])
    return markdown_table(["target", "limit", "layerfs", "verdict"], rows)


def report(
    spec: ImageSpec,
    archive: Path,
    figs: dict[str, Figures],
    imports: ImportFigures,
    disk: DiskUse | None,
    reps: int,
    load_at_start: float,
) -> str:
    """The markdown section: how it was produced, the tables, spreads and sanity checks."""
    base = "busybox" if spec.quick else "debootstrap minbase bookworm"
    entries = ", ".join(f"{name} {f.entries}" for name, f in figs.items())
    tar_check = ", ".join(f"{name} {f.tar_bytes}" for name, f in figs.items())
    lost = ", ".join(f"{name} {f.warm_lost}" for name, f in figs.items())
    spread = "; ".join(
        f"{name}: mount {f.mount.spread()}, second mount {f.second_mount.spread()}, "
        f"cold find {f.cold_find.spread()}, cold tar {f.cold_tar.spread()}, "
        f"warm tar {f.warm_tar.spread()}, cold read {f.cold_read.spread()}"
        + (
            f", cold read with the content cache evicted {f.empty_cache_read.spread()}"
            if f.empty_cache_read.values
            else ""
        )
        for name, f in figs.items()
    )
    daemons = "; ".join(f"{name}: {f.daemon_pids}" for name, f in figs.items() if f.daemon_pids)
    lfs = figs.get("layerfs")
    layerfs_notes = []
    if lfs is not None:
        layerfs_notes = [
            f"- layerfs: a kernel overlay, as mounted `{lfs.layers}`; the store's view daemon"
            " (a FUSE mount under RUN=/run/layerfs/views, shared by every mount) fills the"
            " content cache (`STORE/cache/content/data`) in the background. All layerfs"
            " figures but the first mount's and the evicted-cache read are taken with the"
            " content cache full: before them the benchmark mounts once and waits until the"
            " content named by every non-empty regular file's `trusted.overlay.redirect` is in"
            " the cache (it stays on disk between mounts; each mount starts the view daemon"
            " again, as the last unmount stops it).",
            "- First mount: of the store the last `layerfs import` left (the import puts the"
            " files' bytes into the content cache as it reads them); its cold read of the big"
            " file (caches dropped) is the first read after import.",
            f"- Content cache evicted (`STORE/cache/content` removed while nothing is mounted,"
            " then mount, drop caches, read; median of"
            f" {len(lfs.empty_cache_read.values)}): as after `layerfs import --no-cache`, or"
            " once the cache evicted the image. From a mount with the cache empty until every"
            f" file was in it: {fmt_secs(lfs.cache_fill)} ({fmt_bytes(lfs.cache_bytes)}"
            " allocated).",
            "- Second mount: one mount stays while a second one of the same image is timed"
            " (layerfs: both over the one view).",
        ]
    intro = [
        "## Read-only mounts: layerfs vs fuse-overlayfs vs kernel overlayfs",
        "",
        f"Command: `{command_line()}` (as root, from the repository root).",
        f"Machine: {environment_summary(load_at_start)}.",
        "",
        f"- Image `{spec.tag}`: {base} plus 3 layers (deletions and an opaque dir; replaced"
        f" content and modes; a {spec.big_mb} MiB random file and small files).",
        f"- Entries seen through each mount: {entries}.",
        f"- Median of {reps} sample(s) per timing, taken in rounds: each round samples one"
        " figure on every system in turn (in the order of the table's columns), and all stay"
        " mounted together for the warm figures. Cold = fresh mount and"
        " `echo 3 > /proc/sys/vm/drop_caches` before each sample. Peak RSS = VmHWM of the"
        " process tree serving the mount (layerfs: the view daemon, by the pid its record"
        " keeps) after find, tar and reads on one mount.",
        "- Overlay mounts use the daemon's overlay2 layer dirs read-only"
        " (`lowerdir=UPPER:LOWER...`).",
        *layerfs_notes,
    ]
    parts = [
        "\n".join(intro),
        overlay_table(figs, spec),
        import_table(imports, archive.stat().st_size),
    ]
    if disk is not None:
        parts.append(
            "Disk use for the image, allocated bytes, after the run (the content cache full):"
            "\n\n" + disk_table(disk)
        )
    return "\n\n".join(
        [
            *parts,
            "Targets (layerfs; the speed figures against kernel overlayfs over Docker's"
            " overlay2 dirs and against fuse-overlayfs, the content cache full unless"
            " said; mount times from the CLI, as measured above):\n\n" + targets_table(figs, spec),
            f"Spread (min–max): {spread}.",
            f"Processes behind the peak RSS: {daemons or 'none'}.",
            *(
                [f"layerfs's mount log (`STORE/cache/logs/mount.log`): {lfs.mount_log}."]
                if lfs is not None and lfs.mount_log
                else []
            ),
            "Warm samples retaken because another process dropped the page cache meanwhile"
            f" (/proc/vmstat drop_pagecache): {lost}.",
            f"Bytes of `tar cf - .` (equal when the trees match): {tar_check}.",
        ]
    )


def say(msg: str) -> None:
    click.echo(f"[bench-readonly] {msg}", err=True)


ENCRYPTION_SECTION = "readonly-encryption"
_PASSWORD_VARS = ("LAYERFS_PASSWORD_FILE", "LAYERFS_PASSWORD_COMMAND", "CREDENTIALS_DIRECTORY")


def _layerfs_with(store: Path, tag: str, name: str, password: Path | None) -> System:
    """layerfs on ``store``, opened with ``password`` (or with none: an unencrypted store)."""
    prefix = ["env", *(f"-u{v}" for v in _PASSWORD_VARS), "-uLAYERFS_TESTONLY_WEAKEN_KDF"]
    if password is not None:
        prefix.append(f"LAYERFS_PASSWORD_FILE={password}")
    return System(
        name,
        lambda m: [*prefix, *LAYERFS, "--store", str(store), "mount", tag, str(m)],
        lambda m: [*prefix, *LAYERFS, "--store", str(store), "umount", str(m)],
        store=store,
    )


def measure_encryption(
    archive: Path, tag: str, work: Path, reps: int, spec: ImageSpec
) -> dict[str, Figures]:
    """The layerfs figures of one image in an unencrypted and in an encrypted store.

    The encrypted store's key file has the default KDF parameters, so its mount
    time includes one key derivation per process, as a user's would.
    """
    password = work / "password"
    password.write_text("bench-readonly-password\n")
    systems = []
    try:
        for name, pw in (("unencrypted", None), ("encrypted", password)):
            store = work / f"store-{name}"
            systems.append(_layerfs_with(store, tag, name, pw))
            shutil.rmtree(store, ignore_errors=True)
            env = {k: v for k, v in os.environ.items() if k not in _PASSWORD_VARS}
            env.pop("LAYERFS_TESTONLY_WEAKEN_KDF", None)
            if pw is not None:
                env["LAYERFS_PASSWORD_FILE"] = str(pw)
            run([*LAYERFS, "--store", str(store), "import", str(archive), "--tag", tag], env=env)
        say("measuring layerfs on the unencrypted and the encrypted store, samples interleaved")
        return measure_all(systems, work / "mnt", spec.big_path, reps)
    finally:
        for system in systems:
            assert system.store is not None
            stop_views(system.store)
            shutil.rmtree(system.store, ignore_errors=True)


def encryption_report(spec: ImageSpec, figs: dict[str, Figures], reps: int, load: float) -> str:
    plain, enc = figs["unencrypted"], figs["encrypted"]
    rows = []
    for label, get, fmt in figure_getters(spec, "first mount after import"):
        a, b = get(plain), get(enc)
        r = ratio(b, a)
        verdict = "" if r is None else ("within 10%" if r <= 1.10 else "**over 10%**")
        rows.append([label, fmt(a), fmt(b), fmt_ratio(r), verdict])
    table = markdown_table(
        ["figure", "unencrypted", "encrypted", "encrypted ÷ unencrypted", ""], rows
    )
    return "\n\n".join(
        [
            "## Read-only mounts: encrypted vs unencrypted store",
            f"Command: `{command_line()}` (as root, from the repository root).\n"
            f"Machine: {environment_summary(load)}.",
            f"- Image `{spec.tag}`, imported into each store; layerfs mounts of each, measured "
            f"in this run, their samples interleaved (each round takes one sample of a figure "
            f"from each store); median of {reps} sample(s); cold = fresh mount "
            "and dropped caches. The encrypted store's key file has the default KDF "
            "parameters: every mount process derives the key once.",
            table,
            f"Entries seen: unencrypted {plain.entries}, encrypted {enc.entries}; bytes of "
            f"`tar cf - .`: {plain.tar_bytes} and {enc.tar_bytes} (equal when the trees match).",
        ]
    )


@click.command()
@click.option("--quick", is_flag=True, help="Small busybox-based image, one sample each.")
@click.option("--reps", type=int, default=None, help="Samples per timing (default 3, quick 1).")
@click.option("--skip-layerfs", is_flag=True, help="Measure only the overlay mounts.")
@click.option("--no-write", is_flag=True, help="Print the results, leave RESULTS.md alone.")
@click.option(
    "--encryption",
    is_flag=True,
    help="Compare layerfs on an unencrypted and an encrypted store instead of the peers.",
)
def main(
    quick: bool, reps: int | None, skip_layerfs: bool, no_write: bool, encryption: bool
) -> None:
    """Benchmark read-only mounts of one image with layerfs, fuse-overlayfs and overlayfs."""
    try:
        load_at_start = os.getloadavg()[0]
        compile_bytecode()
        require_root()
        require_tools("docker", "fuse-overlayfs", "fusermount3", "tar", "find", "dd")
        spec = QUICK if quick else FULL
        reps = reps or (1 if quick else 3)
        work = WORK_DIR / "readonly"
        work.mkdir(parents=True, exist_ok=True)
        tag = ensure_image(spec, work)
        archive = ensure_archive(tag, work)
        if encryption:
            figs = measure_encryption(archive, tag, work, reps, spec)
            text = encryption_report(spec, figs, reps, load_at_start)
            click.echo(text)
            if not no_write:
                write_section(ENCRYPTION_SECTION, text)
            return
        with_layerfs = not skip_layerfs and layerfs_available()
        if not with_layerfs:
            say("layerfs import/mount/umount are not available: measuring the overlays only")

        say("import: layerfs vs docker load")
        imports, store = measure_imports(archive, tag, work, reps, with_layerfs)
        lowerdirs = overlay_lowerdirs(tag)
        systems = [fuse_overlayfs(lowerdirs), kernel_overlay(lowerdirs)]
        if with_layerfs:
            systems.insert(0, layerfs(store, tag))
        disk = None
        try:
            say("measuring " + ", ".join(s.name for s in systems) + ", samples interleaved")
            figs = measure_all(systems, work / "mnt", spec.big_path, reps)
            for system in systems:
                if system.store is not None:
                    disk = disk_use(system.store, tag)
                    figs[system.name].mount_log = mount_log_summary(
                        system.store, WORK_DIR / "logs" / "readonly-mount.log"
                    )
        finally:
            if with_layerfs:
                stop_views(store)
            shutil.rmtree(store, ignore_errors=True)  # the archive and images stay cached
        text = report(spec, archive, figs, imports, disk, reps, load_at_start)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(text)
    if not no_write:
        write_section(SECTION, text)
        say("results written to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()

"""bench_snapshotter: containers on the layerfs snapshotter against containerd's overlayfs.

A private containerd (tests.support.containerd: its own root, state and
sockets, the layerfs snapshotter as a proxy plugin, a local unencrypted store)
and the Debian minbase test image (tests.support.debian), saved by Docker:

- **import**: `ctr image import --snapshotter S ARCHIVE` for each snapshotter,
  `--import-reps` times each, each time in a new private containerd, after an
  untimed `--no-unpack` import has put the archive's blobs into containerd's
  content store (so each timed import only unpacks) and a sync of the disk,
  in alternating order; median. Then once more in the containerd the other
  figures use: for layerfs also the time until the image's top chain
  is mounted (done in the background after the last commit), and the time
  until the view has copied every file into the content cache. Bytes each
  stores: overlayfs its snapshot directories; layerfs the store (packs,
  indexes, documents), its local cache (content cache, index, metadata tree)
  and the snapshotter root. containerd's content store (the archive's blobs)
  is the same for both and shown apart.
- **run**: `ctr run --rm IMAGE ID true` from the image already unpacked by each,
  `--reps` times each (alternating), median; the first layerfs run is shown too.
- **memory**: `--containers` containers of the image (`ctr run -d ... sleep`);
  resident memory (RSS, and PSS: shared pages divided among their users) of
  the layerfs processes then: the snapshotter server, its helper processes
  alive at that moment (commits, chain mounts) and the store's view daemon(s),
  in sum and each.
- **second host** (`--s3`, needs the Ceph RGW of the tests): host A imports the
  image into a fresh S3 bucket with `layerfs import`; host B (another
  snapshotter root, cache and containerd) runs it via `layerfs containerd
  import` against a full `ctr image import` of the archive on B (overlayfs,
  then layerfs), each until the first output of `cat /etc/debian_version`.

    .venv/bin/python -m benchmarks.bench_snapshotter [--quick] [--s3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    WORK_DIR,
    BenchError,
    Samples,
    command_line,
    compile_bytecode,
    environment_summary,
    human_bytes,
    markdown_table,
    require_root,
    require_tools,
    write_section,
)

SECTION = "bench_snapshotter"
LAYERFS_CLI = [sys.executable, "-c", "from layerfs.cli import main; main()"]


def say(text: str) -> None:
    print(f"[bench_snapshotter] {text}", file=sys.stderr, flush=True)


def du(path: Path) -> int:
    """Allocated bytes below ``path`` on its own filesystem (mounts below are skipped)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sx", "-B1", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout else 0


def rss(pid: int, key: str = "Rss") -> int:
    """Resident bytes of a process (``Pss``: shared pages divided among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def view_daemon_pids(base: Path) -> list[int]:
    """The view daemons whose store cache lies below ``base``."""
    from layerfs.fs.views import DaemonInfo, run_dir

    pids = []
    for record in (run_dir() / "views").glob("*.json"):
        info = DaemonInfo.load(record.with_suffix(""))
        if info is not None and info.cache_dir.startswith(f"{base}/") and info.pid:
            pids.append(info.pid)
    return pids


def layerfs_processes(server: int, base: Path) -> list[tuple[str, int]]:
    """The layerfs processes serving a private containerd's containers, named: the
    snapshotter server, its helpers alive now (commits, chain mounts) and the view
    daemon(s) of the store below ``base``."""
    from benchmarks.common import process_tree

    views = view_daemon_pids(base)
    helpers = [p for p in process_tree(server)[1:] if p not in views] if server else []
    procs = [("server", server)] if server else []
    return procs + [("helper", p) for p in helpers] + [("view daemon", p) for p in views]


def top_chain_mount(root: Path) -> Path | None:
    """The ro mount of the newest committed snapshot of a snapshotter root, once mounted."""
    from layerfs.fs.mounting import kernel_mounts
    from layerfs.snapshotter.metadata import Kind, Metadata

    meta = Metadata(root / "metadata.db")
    try:
        committed = [s for s in meta.all() if s.kind is Kind.COMMITTED]
    finally:
        meta.close()
    if not committed:
        return None
    mountpoint = str(root / "snapshots" / str(committed[-1].id) / "ro")
    return Path(mountpoint) if any(m.mountpoint == mountpoint for m in kernel_mounts()) else None


def wait_for(check, what: str, timeout: float = 600.0):  # noqa: ANN001, ANN201
    start = time.monotonic()
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() - start > timeout:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


def first_output(ctd_address: Path, ns: str, snapshotter: str, ref: str, name: str) -> float:
    """Seconds from `ctr run --rm` until the container's first line of output."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["ctr", "-a", str(ctd_address), "-n", ns, "run", "--rm", "--snapshotter", snapshotter,
         ref, name, "cat", "/etc/debian_version"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline() if proc.stdout else ""
    elapsed = time.perf_counter() - start
    proc.wait()
    if proc.returncode != 0 or not line.strip():
        raise BenchError(f"ctr run {ref} under {snapshotter} gave no output")
    return elapsed


@dataclass
class Figures:
    rows: list[list[str]]
    notes: list[str]


def import_samples(archive: Path, reps: int) -> dict[str, Samples]:
    """`ctr image import` of ``archive`` with each snapshotter, ``reps`` times, each time in
    a new private containerd (a first import: nothing of it in the store yet). The archive's
    blobs go into containerd's content store untimed first, so each timed import only
    unpacks; the disk is synced before each; the order alternates, and after a layerfs
    import its background work (the chain mount, the content cache's fill) is waited for
    before the next import starts."""
    from benchmarks.layerfs_views import wait_content_cached
    from tests.support.containerd import private_containerd

    samples = {"layerfs": Samples(), "overlayfs": Samples()}
    for i in range(reps):
        order = ("overlayfs", "layerfs") if i % 2 == 0 else ("layerfs", "overlayfs")
        with private_containerd() as ctd:
            ctd.ctr("image", "import", "--no-unpack", str(archive))
            for snap in order:
                say(f"import {i + 1}/{reps}: ctr image import --snapshotter {snap}")
                os.sync()
                start = time.perf_counter()
                done = ctd.ctr("image", "import", "--snapshotter", snap, str(archive), check=False)
                samples[snap].add(time.perf_counter() - start)
                if done.returncode != 0:
                    raise BenchError(f"ctr image import ({snap}): {done.stderr.strip()[-500:]}")
                if snap == "layerfs":
                    mounted = wait_for(
                        lambda c=ctd: top_chain_mount(c.snapshotter.root), "the chain mount"
                    )
                    wait_content_cached(mounted)
    return samples


def local_runs(archive: Path, ref: str, reps: int, containers: int, import_reps: int) -> Figures:
    from tests.support.containerd import private_containerd

    rows: list[list[str]] = []
    notes: list[str] = []
    with private_containerd() as ctd:
        base = ctd.base

        def ctr(snap: str, *args: str) -> subprocess.CompletedProcess:
            # one namespace (the one whose tasks the helper removes when it stops)
            done = ctd.ctr(*args, check=False)
            if done.returncode != 0:
                raise BenchError(f"ctr {' '.join(args)}: {done.stderr.strip()[-500:]}")
            return done

        imports: dict[str, float] = {}
        content_root = base / "root" / "io.containerd.content.v1.content"
        # the archive's blobs into containerd's content store first, untimed: then each
        # timed import only unpacks (the first would otherwise also write the blobs)
        ctr("overlayfs", "image", "import", "--no-unpack", str(archive))
        for snap in ("overlayfs", "layerfs"):
            say(f"ctr image import --snapshotter {snap}")
            os.sync()  # neither import pays for writing back what came before it
            start = time.perf_counter()
            ctr(snap, "image", "import", "--snapshotter", snap, str(archive))
            imports[snap] = time.perf_counter() - start
            if snap == "layerfs":
                mounted = wait_for(lambda: top_chain_mount(ctd.snapshotter.root), "the chain mount")
                imports["chain"] = time.perf_counter() - start
                from benchmarks.layerfs_views import wait_content_cached

                wait_content_cached(mounted)
                imports["filled"] = time.perf_counter() - start
        store = ctd.snapshotter.store
        assert isinstance(store, Path)
        cache, stored = store / "cache", du(store) - du(store / "cache")
        ours = stored + du(cache) + du(ctd.snapshotter.root)
        overlay = du(base / "root" / "io.containerd.snapshotter.v1.overlayfs")
        timed = import_samples(archive, import_reps)
        lfs, ovl = timed["layerfs"].median, timed["overlayfs"].median
        rows.append([f"`ctr image import` (median of {import_reps})", f"{lfs:.2f} s",
                     f"{ovl:.2f} s", f"{lfs / ovl:.2f}×"])  # fmt: skip
        notes.append(
            f"import samples, each in a new containerd with the archive's blobs already in its "
            f"content store: layerfs {timed['layerfs'].spread()}, overlayfs "
            f"{timed['overlayfs'].spread()}; the import the figures below follow: layerfs "
            f"{imports['layerfs']:.2f} s, overlayfs {imports['overlayfs']:.2f} s."
        )
        rows.append(["… until the top chain is mounted", f"{imports['chain']:.2f} s", "", ""])
        rows.append(["… until the content cache holds every file", f"{imports['filled']:.2f} s",
                     "", ""])  # fmt: skip
        rows.append(["bytes stored by the snapshotter", human_bytes(ours), human_bytes(overlay),
                     f"{ours / overlay:.2f}×" if overlay else ""])  # fmt: skip
        notes.append(
            f"layerfs bytes: store {human_bytes(stored)} (packs, indexes, documents), local "
            f"cache {human_bytes(du(cache))} (content cache, index, metadata tree), snapshotter "
            f"root {human_bytes(du(ctd.snapshotter.root))}; containerd's content store (the "
            f"archive's blobs, kept for both) {human_bytes(du(content_root))}."
        )

        say(f"ctr run --rm true, {reps} times each")
        runs = {"layerfs": Samples(), "overlayfs": Samples()}
        for i in range(reps):
            for snap in ("layerfs", "overlayfs"):
                start = time.perf_counter()
                ctr(snap, "run", "--rm", "--snapshotter", snap, ref, f"run-{snap}-{i}", "true")
                runs[snap].add(time.perf_counter() - start)
        first = runs["layerfs"].values[0]
        ratio = runs["layerfs"].median / runs["overlayfs"].median
        rows.append(["`ctr run --rm IMAGE true` (median)", f"{runs['layerfs'].median:.3f} s",
                     f"{runs['overlayfs'].median:.3f} s", f"{ratio:.2f}×"])  # fmt: skip
        rows.append(["… first run after import", f"{first:.3f} s",
                     f"{runs['overlayfs'].values[0]:.3f} s", ""])  # fmt: skip
        notes.append(
            f"run samples: layerfs {runs['layerfs'].spread()}, "
            f"overlayfs {runs['overlayfs'].spread()}."
        )

        say(f"{containers} containers")
        for i in range(containers):
            ctr("layerfs", "run", "-d", "--snapshotter", "layerfs", ref, f"c{i}", "sleep", "3600")
        server = ctd.snapshotter.proc.pid if ctd.snapshotter.proc else 0
        procs = layerfs_processes(server, base)
        total = sum(rss(p) for _, p in procs)
        shared = sum(rss(p, "Pss") for _, p in procs)
        rows.append([f"{containers} containers: resident memory of layerfs processes (RSS; PSS)",
                     f"{human_bytes(total)}; {human_bytes(shared)}", "", ""])  # fmt: skip
        each = ", ".join(
            f"{what} {human_bytes(rss(p))}; {human_bytes(rss(p, 'Pss'))}" for what, p in procs
        )
        notes.append(f"memory with {containers} containers running (RSS; PSS): {each}.")
    return Figures(rows, notes)


def second_host(archive: Path, tag: str) -> Figures:
    from tests.support import ceph
    from tests.support.containerd import private_containerd

    env = ceph.ensure_rgw()
    env.export()
    bucket = ceph.new_bucket(env, "bench-sn")
    url = f"s3://{bucket}/store"
    ref = f"docker.io/{tag}"
    work = WORK_DIR / "snapshotter"
    password = work / "password"
    work.mkdir(parents=True, exist_ok=True)
    password.write_text("bench password\n")
    password.chmod(0o600)
    env_a = {**os.environ, "LAYERFS_PASSWORD_FILE": str(password),
             "LAYERFS_CACHE_DIR": str(work / "cache-a")}  # fmt: skip
    rows: list[list[str]] = []
    try:
        subprocess.run([*LAYERFS_CLI, "--store", url, "init"], env=env_a, check=True,
                       capture_output=True)  # fmt: skip
        say("host A: layerfs import into S3")
        start = time.perf_counter()
        subprocess.run([*LAYERFS_CLI, "--store", url, "import", "--from-docker", tag],
                       env=env_a, check=True, capture_output=True)  # fmt: skip
        rows.append(["host A: `layerfs import --from-docker` into S3",
                     f"{time.perf_counter() - start:.2f} s", "", ""])  # fmt: skip
        os.environ["LAYERFS_PASSWORD_FILE"] = str(password)  # host B's snapshotter
        with private_containerd(store_url=url) as b:
            env_b = {**env_a, "LAYERFS_CACHE_DIR": str(b.base / "cache")}
            say("host B: layerfs containerd import")
            start = time.perf_counter()
            subprocess.run([*LAYERFS_CLI, "--store", url, "containerd", "import", tag,
                            "--address", str(b.address), "-n", "bench-lazy"],
                           env=env_b, check=True, capture_output=True)  # fmt: skip
            registered = time.perf_counter() - start
            out = first_output(b.address, "bench-lazy", "layerfs", ref, "lazy-1")
            total = f"{registered:.2f} + {out:.2f} = {registered + out:.2f} s"
            rows.append(["host B: `layerfs containerd import`, then first output",
                         total, "", ""])  # fmt: skip
            for snap in ("overlayfs", "layerfs"):
                say(f"host B: ctr image import --snapshotter {snap}")
                start = time.perf_counter()
                subprocess.run(["ctr", "-a", str(b.address), "-n", f"bench-full-{snap}", "image",
                                "import", "--snapshotter", snap, str(archive)],
                               check=True, capture_output=True)  # fmt: skip
                imported = time.perf_counter() - start
                out = first_output(b.address, f"bench-full-{snap}", snap, ref, f"bench-full-{snap}")
                total = f"{imported:.2f} + {out:.2f} = {imported + out:.2f} s"
                rows.append([f"host B: `ctr image import --snapshotter {snap}`, then first output",
                             total, "", ""])  # fmt: skip
            rows.append(["host B: its local cache afterwards", human_bytes(du(b.base / "cache")),
                         "", ""])  # fmt: skip
    finally:
        ceph.remove_bucket(env, bucket)
        shutil.rmtree(work, ignore_errors=True)
        for ns in (
            "bench-lazy",
            "bench-full-overlayfs",
            "bench-full-layerfs",
        ):  # runc's empty state roots
            with suppress(OSError):
                os.rmdir(f"/run/containerd/runc/{ns}")
    return Figures(rows, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs, 5 containers")
    parser.add_argument("--reps", type=int, default=None, help="runs of each (10)")
    parser.add_argument("--containers", type=int, default=None, help="containers (20)")
    parser.add_argument("--import-reps", type=int, default=None, help="imports of each (3)")
    parser.add_argument("--s3", action="store_true", help="also the second host over S3")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    compile_bytecode()
    require_root()
    require_tools("docker", "containerd", "ctr", "du")
    from tests.support.debian import DEBIAN_IMAGE, ensure_debian_image
    from tests.support.images import docker_save

    reps = args.reps or (3 if args.quick else 10)
    containers = args.containers or (5 if args.quick else 20)
    tag = ensure_debian_image()
    work = WORK_DIR / "snapshotter-archive"
    work.mkdir(parents=True, exist_ok=True)
    archive = work / "debian.tar"
    if not archive.exists():
        docker_save(DEBIAN_IMAGE, archive)
    import_reps = args.import_reps or (1 if args.quick else 3)
    figures = local_runs(archive, f"docker.io/{tag}", reps, containers, import_reps)
    if args.s3:
        figures.rows.extend(second_host(archive, tag).rows)
    text = "\n".join(
        [
            "## bench_snapshotter: containerd with the layerfs snapshotter",
            "",
            f"Command: `{command_line()}`. Image: {DEBIAN_IMAGE} (Debian minbase, one layer).",
            f"Machine: {environment_summary(load_at_start)}.",
            "",
            markdown_table(["", "layerfs", "overlayfs", "ratio"], figures.rows),
            "",
            *[f"- {note}" for note in figures.notes],
        ]
    )
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()

"""Measurement helpers shared by the benchmark scripts.

Everything here is generic: timing with medians, dropping the kernel caches,
peak RSS of a process tree read from /proc, sizes of directory
trees, and writing result sections into benchmarks/RESULTS.md.

A results section is the text between ``<!-- NAME -->`` and ``<!-- /NAME -->``;
``write_section`` replaces it in place (or appends it), so each benchmark
script owns its section and never touches the others'.

The helpers need root for drop_caches; a private dockerd for `docker load` timings
is tests.support.private_dockerd. Benchmarks
only report figures and never assert on them.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.clitools import human_bytes  # noqa: F401 - re-exported for the scripts

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
WORK_DIR = BENCH_DIR / "work"  # git-ignored scratch space and caches


class BenchError(Exception):
    """A benchmark cannot run (missing tool, failed step); the message says what to do."""


# -- running commands ---------------------------------------------------------------


def run(
    cmd: Sequence[str], *, input: bytes | None = None, env: dict | None = None, quiet: bool = True
) -> subprocess.CompletedProcess:
    """Run a command; raise BenchError with its stderr if it fails."""
    proc = subprocess.run(
        list(cmd),
        input=input,
        env=env,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.PIPE,
    )
    if proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        raise BenchError(f"{shlex.join(cmd)} failed (exit {proc.returncode}): {err[-2000:]}")
    return proc


def run_shell(script: str, *, cwd: str | Path | None = None) -> None:
    """Run a /bin/sh pipeline with its output discarded; raise BenchError if it fails."""
    proc = subprocess.run(
        ["/bin/sh", "-c", "set -e; " + script],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if proc.returncode != 0:
        raise BenchError(f"`{script}` failed: {proc.stderr.decode(errors='replace').strip()}")


def require_tools(*names: str) -> None:
    """Raise BenchError naming every missing executable."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (install them with apt-get)")


def compile_bytecode() -> None:
    """Compile the project's modules to bytecode, as installing the package does.

    The processes a benchmark starts (the CLIs, daemons, helpers) then load it
    instead of compiling each module they import: where PYTHONDONTWRITEBYTECODE
    is set (as on the machines here), a process of an editable install compiles
    them all at every start, about 0.1 s that no installed package pays.
    """
    import compileall

    for package in ("layerfs", "volplugin"):
        compileall.compile_dir(REPO_DIR / package, quiet=1)


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("this benchmark needs root (drop_caches, mounts, a second dockerd)")


# -- timing ------------------------------------------------------------------------


@dataclass
class Samples:
    """Repeated measurements of one figure; report the median."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def spread(self) -> str:
        """'min–max over n' for the notes column."""
        if not self.values:
            return "no samples"
        return f"{min(self.values):.3g}–{max(self.values):.3g} over {len(self.values)}"


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def time_call(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat(fn: Callable[[], float], times: int) -> Samples:
    """Call a function that returns one measurement ``times`` times."""
    samples = Samples()
    for _ in range(times):
        samples.add(fn())
    return samples


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (needs root).

    FUSE daemons keep their own userspace caches: to measure them cold, remount too.
    """
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cache_drops() -> int:
    """How often anyone dropped the page cache since boot (``drop_pagecache`` in /proc/vmstat)."""
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


def time_warm(fn: Callable[[], object], attempts: int = 5) -> tuple[float, int]:
    """Seconds ``fn()`` takes while nobody drops the page cache; and how many tries were lost.

    drop_caches is global, so another job on the machine can turn a warm sample
    cold. A sample during which the cache was dropped is discarded: ``fn`` runs
    once more to warm the cache and is timed again, up to ``attempts`` times
    (then the last, disturbed, time is returned).
    """
    lost = 0
    while True:
        before = cache_drops()
        seconds = time_call(fn)
        if cache_drops() == before or lost + 1 >= attempts:
            return seconds, lost
        lost += 1
        fn()


# -- processes and memory ----------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes(pids: Sequence[int]) -> int:
    """Sum of the kernel's peak RSS (VmHWM) of each process in ``pids``.

    VmHWM is exact per process (no sampling). For a tree it is an upper bound of
    the tree's joint peak, since the members may peak at different moments.
    """
    return sum(_status_kib(p, "VmHWM") for p in pids) * 1024


def pids_with_arg(arg: str) -> list[int]:
    """Processes (not us) with ``arg`` as one of their command-line arguments.

    Finds a FUSE daemon that detached from its launcher by its mountpoint argument.
    """
    found = []
    want = os.fsencode(arg)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args:
            found.append(int(entry.name))
    return found


def mount_daemon_peak_rss(mountpoint: str | Path) -> tuple[int, list[int]]:
    """Peak RSS (bytes) of the processes serving a FUSE mount, and their pids.

    The daemon is found by its mountpoint argument; its whole process tree counts.
    Returns (0, []) when no process serves the mount (a kernel filesystem).
    """
    roots = pids_with_arg(str(mountpoint))
    pids = sorted({p for root in roots for p in process_tree(root)})
    return peak_rss_bytes(pids), pids


# -- mounts ------------------------------------------------------------------------


def is_mounted(path: str | Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_mounted(path: str | Path, timeout: float = 30.0) -> None:
    """Poll until ``path`` is a mountpoint; raise BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if time.monotonic() > deadline:
            raise BenchError(f"{path} was not mounted within {timeout:.0f} s")
        time.sleep(0.001)


def mounts_under(path: str | Path) -> list[str]:
    """Mountpoints at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    inside = [p for p in points if p == base or p.startswith(base + "/")]
    return sorted(set(inside), key=len, reverse=True)


def force_unmount_under(path: str | Path) -> None:
    """Lazily unmount everything at or below ``path`` (cleanup after a failure)."""
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)


# -- sizes -------------------------------------------------------------------------


@dataclass
class TreeSize:
    """Totals of a directory tree."""

    files: int = 0
    apparent: int = 0  # sum of st_size of regular files
    allocated: int = 0  # st_blocks * 512 of everything, hard links counted once


def tree_size(root: str | Path) -> TreeSize:
    size = TreeSize()
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size.allocated += st.st_blocks * 512
            if name in filenames and not os.path.islink(os.path.join(dirpath, name)):
                size.files += 1
                size.apparent += st.st_size
    return size


# -- results -------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_summary(load_at_start: float | None = None) -> str:
    """One line about the machine, its load and the code the figures came from.

    Pass ``os.getloadavg()[0]`` taken when the benchmark started: a busy machine
    (other jobs competing for the cores) makes every timing slower and noisier.
    """
    cpu = ""
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load_now = f"{os.getloadavg()[0]:.1f}"
    if load_at_start is None:
        load = f"1-min load average {load_now} at the end"
    else:
        load = f"1-min load average {load_at_start:.1f} at the start, {load_now} at the end"
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit or '?'}, "
        f"{os.cpu_count()} × {cpu or platform.machine()}, {mem_gib:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {sys.version.split()[0]}, {load}"
    )


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> None:
    """Replace the ``<!-- name -->`` … ``<!-- /name -->`` section of ``path`` with ``body``.

    The section is appended when missing. A lock file serializes concurrent writers.
    """
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with open(WORK_DIR / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else "# Benchmark results\n"
        start = text.find(begin)
        stop = text.find(end, start + len(begin)) if start >= 0 else -1
        if start >= 0 and stop >= 0:
            text = text[:start] + block + text[stop + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def command_line() -> str:
    """How this process was started, as a copy-pasteable command run from the repo root."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        argv = ["-m", spec.name, *argv[1:]]
    python = os.path.relpath(sys.executable, REPO_DIR)
    if python.startswith(".."):
        python = sys.executable
    return shlex.join([python, *argv])

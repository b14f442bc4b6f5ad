"""bench_roaming: roaming volumes between two hosts: the next host's first read, the handover.

Two "hosts" on this machine (tests/support/hosts.py: a dockerd each, in mount and network
namespaces of its own), a `volplugin serve` on each, one encrypted store in a bucket of a
Ceph RGW (a private cluster under benchmarks/work/roaming/ceph, memstore sized for the
run, unless --shared-ceph). Each part of each repetition starts new plugins (new names,
so empty roots, caches and image views) and uses new volume names, so every read on B is
a first read: B has never seen the content. The content is the same in every part (A's
handovers upload it once; B's caches never have it).

1. **The next host's first read** (target <= 1 s). On A, `docker run --rm` copies the
   volume's content (--size of random files, a few hundred of sizes from 1 KiB to
   32 MiB) into a new roaming volume; its exit is A's last Unmount, the handover. On B,
   the same container, `sh -c 'echo first $(head -c 4096 /data/F | md5sum); find /data
   -type f | xargs cat >/dev/null; echo all'` (F the largest file), is timed from the
   start of `docker run` to each line as the docker CLI prints it, and to its exit:
   * full restore, what a user does without roaming: `docker volume create -d PLAIN -o
     from=HEAD` on a second plugin of B (its own empty cache: the roaming plugin's
     would hold what its fill fetched), then the container on that volume;
   * lazily: the container on the roaming volume, B's first Mount of it (served from
     the head over a kernel overlay while B's plugin fills it in the background);
   * after the fill: the container again once B's plugin has filled and switched it.
   The contents read on B are checked against the files written on A (md5sum of every
   file, untimed).
2. **The handover with 1% changed** (target <= 1.5x a plain incremental backup). On A,
   a roaming volume and a plain one (same plugin, same --size content) each mounted by
   a running container; a checkpoint of each (/Backup.Create with Wait on A's plugin
   socket); then `docker exec` rewrites files holding 1% of the bytes in each (new
   random content, different for the two) and the page cache is synced. Timed: (a)
   `docker stop` (then `docker rm`) of the roaming volume's container, its last Unmount,
   the handover, with the plugin's own Unmount time from its access log; (b) a
   /Backup.Create with Wait of the plain volume. The two take turns going first.
   End to end: from the start of that `docker stop` on A to the first read on B
   (`docker run` on B right after `docker stop` returns) of a file rewritten on A; that
   container exits after the read, and its exit (B's handover, B's first backup of the
   volume) is timed too.

Medians over --reps. The page cache is not dropped (drop_caches is machine-wide and
others' jobs run here): the whole-volume reads after a restore or a fill read what the
page cache kept. Writes the `roaming` section of benchmarks/RESULTS.md and the figures
of every repetition as JSON to benchmarks/work/roaming/result.json.

    .venv/bin/python -m benchmarks.bench_roaming [--size 1G] [--reps 3] [--no-write]
    .venv/bin/python -m benchmarks.bench_roaming --size 256M --reps 1 --shared-ceph --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import (
    REPO_DIR,
    WORK_DIR,
    BenchError,
    command_line,
    compile_bytecode,
    environment_summary,
    human_bytes,
    markdown_table,
    require_root,
    require_tools,
    write_section,
)
from layerfs.clitools import parse_size
from tests.support import ceph
from tests.support.dockerenv import BASE_IMAGE
from tests.support.hosts import Host, HostPlugin, two_hosts
from tests.support.plugin import ACCESS_MARK

WORK = WORK_DIR / "roaming"
FIRST_READ_TARGET = 1.0  # seconds from `docker run` on B to the first read
HANDOVER_TARGET = 1.5  # handover / plain incremental backup
CHANGED_SHARE = 0.01
PRIVATE_CEPH = {
    "LAYERFS_CEPH_DIR": str(WORK / "ceph"),
    "LAYERFS_RGW_PORT": "7496",
    "LAYERFS_CEPH_MON_PORT": "13396",
}
TIMEOUT = 900.0  # seconds for one docker command
READ_SCRIPT = (
    "echo first $(head -c 4096 /data/{file} | md5sum); "
    "find /data -type f | xargs cat > /dev/null; echo all"
)
FIRST_SCRIPT = "echo first $(head -c 4096 /data/{file} | md5sum)"
HOLD_SCRIPT = "trap 'exit 0' TERM; sleep 100000 & wait"
VERIFY_SCRIPT = "cd /data && find . -type f | sort | xargs md5sum"


# -- content ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """Files written into a volume: relative paths, sizes and md5 digests."""

    root: Path
    files: dict[str, int]  # relative path -> size
    md5: dict[str, str]  # relative path -> md5 of the whole file
    head_md5: dict[str, str]  # relative path -> md5 of its first 4096 bytes

    @property
    def total(self) -> int:
        return sum(self.files.values())

    def largest(self) -> str:
        return max(self.files, key=lambda rel: (self.files[rel], rel))


def _write(root: Path, rel: str, data: bytes) -> tuple[str, str]:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest(), hashlib.md5(data[:4096]).hexdigest()


def make_payload(root: Path, total: int, seed: int) -> Payload:
    """About ``total`` bytes of random (incompressible, unique) files: sizes log-uniform
    from 1 KiB to 32 MiB, in 16 directories two levels deep."""
    rnd = random.Random(seed)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(int(2 ** rnd.uniform(10, 25)), total - sum(sizes) + 1024))
    files, md5, head_md5 = {}, {}, {}
    for i, size in enumerate(sizes):
        rel = f"d{i % 4}/s{i % 16 // 4}/f{i:04}.bin"
        md5[rel], head_md5[rel] = _write(root, rel, rnd.randbytes(size))
        files[rel] = size
    return Payload(root, files, md5, head_md5)


def make_changes(base: Payload, root: Path, share: float, pick: int, seed: int) -> Payload:
    """New random content (from ``seed``) for files of ``base`` holding about ``share`` of
    its bytes (files of at most half that amount, picked at random by ``pick``), written
    under ``root``."""
    rnd = random.Random(pick)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    target = int(base.total * share)
    candidates = sorted(rel for rel, size in base.files.items() if 0 < size <= target // 2)
    rnd.shuffle(candidates)
    files, md5, head_md5 = {}, {}, {}
    for rel in candidates:
        if sum(files.values()) >= target:
            break
        files[rel] = base.files[rel]
    content = random.Random(seed)
    for rel, size in sorted(files.items()):
        md5[rel], head_md5[rel] = _write(root, rel, content.randbytes(size))
    if not files:
        raise BenchError(f"no file of the payload is small enough to change {share:.0%} of it")
    return Payload(root, files, md5, head_md5)


# -- the docker side ---------------------------------------------------------------------------


@dataclass
class Timed:
    """A `docker run` whose container prints marker lines: when each came, and the exit."""

    marks: dict[str, float]  # first word of a line -> seconds after the start
    words: dict[str, str]  # first word -> the rest of its line
    wall: float  # seconds until the docker CLI exited
    error: str = ""  # the CLI's error output when it exited non-zero (with check=False)


def docker(host: Host, *args: str) -> str:
    return host.docker(*args, timeout=TIMEOUT).stdout


def timed(host: Host, *args: str) -> float:
    start = time.perf_counter()
    host.docker(*args, timeout=TIMEOUT)
    return time.perf_counter() - start


def mount_arg(volume: str, driver: str) -> str:
    return f"type=volume,src={volume},dst=/data,volume-driver={driver}"


def timed_run(host: Host, volume: str, driver: str, script: str, check: bool = True) -> Timed:
    """`docker run --rm` of ``script`` with ``volume`` at /data, timed line by line."""
    argv = ["docker", "run", "--rm", "--mount", mount_arg(volume, driver), BASE_IMAGE]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, "sh", "-c", script],
        env=host.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    marks: dict[str, float] = {}
    words: dict[str, str] = {}
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        key, _, rest = line.strip().partition(" ")
        marks.setdefault(key, time.perf_counter() - start)
        words.setdefault(key, rest)
    err = proc.stderr.read()
    rc = proc.wait(TIMEOUT)
    wall = time.perf_counter() - start
    if rc != 0 and check:
        raise BenchError(f"docker run on {host.name} ({volume}) failed (exit {rc}): {err[-2000:]}")
    return Timed(marks, words, wall, err.strip()[-500:] if rc else "")


def status(host: Host, volume: str) -> dict:
    return json.loads(docker(host, "volume", "inspect", volume))[0]["Status"]


def wait_switched(host: Host, volume: str, timeout: float = TIMEOUT) -> float:
    """Wait until the volume's lazy phase is `done` (filled and switched); seconds waited."""
    start = time.monotonic()
    while True:
        lazy = status(host, volume).get("Lazy") or {}
        if lazy.get("Phase") == "done":
            return time.monotonic() - start
        if lazy.get("Error"):
            raise BenchError(f"the lazy fill of {volume} on {host.name}: {lazy['Error']}")
        if time.monotonic() - start > timeout:
            raise BenchError(f"{volume} on {host.name} not switched after {timeout:.0f} s: {lazy}")
        time.sleep(0.5)


def check_read(run: Timed, payload: Payload, rel: str, what: str) -> None:
    got = run.words.get("first", "").split()
    if not got or got[0] != payload.head_md5[rel]:
        raise BenchError(f"{what}: the first 4096 bytes of {rel} are not those written on A")


def verify(host: Host, volume: str, driver: str, expected: dict[str, str], what: str) -> None:
    """md5sum every file of the volume in a container and compare (untimed)."""
    out = host.docker(
        "run", "--rm", "--mount", mount_arg(volume, driver), BASE_IMAGE,
        "sh", "-c", VERIFY_SCRIPT, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    found = {line.split("  ./", 1)[1]: line.split()[0] for line in out.splitlines() if line}
    if found != expected:
        wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise BenchError(f"{what}: {len(wrong)} files differ from what A wrote, e.g. {wrong[:3]}")


# -- the plugins -------------------------------------------------------------------------------


def access(plugin: HostPlugin, endpoint: str, volume: str | None) -> list[dict]:
    """The plugin's access-log records of ``endpoint`` for ``volume`` (None: any; the
    backup endpoints log none), oldest first."""
    records = [
        json.loads(line.split(ACCESS_MARK, 1)[1])
        for line in plugin.log().splitlines()
        if ACCESS_MARK in line
    ]
    return [
        r
        for r in records
        if r["endpoint"] == endpoint and (volume is None or r.get("volume") == volume)
    ]


def last_ms(plugin: HostPlugin, endpoint: str, volume: str | None, timeout: float = 10.0) -> float:
    """The duration of the last ``endpoint`` request for ``volume`` (seconds), which must
    have succeeded; waits up to ``timeout`` for the record (logged as the request ends,
    which may be after the daemon gave up on it)."""
    deadline = time.monotonic() + timeout
    while not (found := access(plugin, endpoint, volume)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not found:
        raise BenchError(f"no {endpoint} of {volume} in the log of {plugin.name}")
    if found[-1]["outcome"] != "ok":
        raise BenchError(f"{endpoint} of {volume} on {plugin.name} failed: {found[-1]}")
    return found[-1]["duration_ms"] / 1000


def backup(plugin: HostPlugin, volume: str) -> tuple[float, dict]:
    """A backup through the plugin's socket, waited for: seconds, and its record."""
    start = time.perf_counter()
    code, doc = plugin.job("Backup.Create", {"Volume": volume})
    seconds = time.perf_counter() - start
    if code != 200:
        raise BenchError(f"backup of {volume} on {plugin.name} failed: {doc.get('Err')}")
    return seconds, doc["Backup"]


def last_backup_job(plugin: HostPlugin, volume: str) -> dict:
    """The newest backup job of ``volume`` on the plugin (a JOB document)."""
    code, doc = plugin.call("Jobs.List", {"Volume": volume})
    if code != 200:
        raise BenchError(f"Jobs.List on {plugin.name} failed: {doc}")
    jobs = [j for j in doc.get("Jobs", []) if j.get("Kind") == "backup"]
    if not jobs:
        raise BenchError(f"no backup job of {volume} on {plugin.name}")
    return jobs[0]  # newest first


def handover_read(plugin: HostPlugin, volume: str) -> int:
    """Bytes read by the last backup of ``volume`` on the plugin (a handover's)."""
    job = last_backup_job(plugin, volume)
    if job["State"] != "succeeded":
        raise BenchError(f"the handover of {volume} on {plugin.name} {job['State']}: {job}")
    return int(job["Result"]["Backup"]["bytes_read"])


@contextlib.contextmanager
def rgw(shared: bool, size: int) -> Iterator[ceph.S3Env]:
    """The tests' RGW, or a private cluster whose memstore holds the run's data."""
    if not shared:
        gb = max(4, int(size * 2.5 / 2**30) + 3)
        os.environ.update(PRIVATE_CEPH, LAYERFS_CEPH_GB=str(gb))
    try:
        env = ceph.ensure_rgw()
        env.export()
        yield env
    finally:
        if not shared:
            ceph.rgw_down()


def prepare_environment() -> None:
    """This checkout first on PYTHONPATH (the plugins run its code); an encrypted store
    with a password file of the benchmark's own and the tests' weak KDF."""
    WORK.mkdir(parents=True, exist_ok=True)
    password = WORK / "password"
    if not password.exists():
        password.write_text(secrets.token_hex(16) + "\n")
        password.chmod(0o600)
    paths = [str(REPO_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ["LAYERFS_PASSWORD_FILE"] = str(password)
    os.environ["LAYERFS_TESTONLY_WEAKEN_KDF"] = "1"
    for name in ("LAYERFS_PASSWORD_COMMAND", "LAYERFS_STORE", "VOLPLUGIN_ROOT", "VOLPLUGIN_NAME"):
        os.environ.pop(name, None)


@dataclass
class Plugins:
    """One repetition's plugins: the roaming driver on A and B, a plain one on B."""

    a: HostPlugin
    b: HostPlugin
    plain_b: HostPlugin


@contextlib.contextmanager
def plugins(a: Host, b: Host, store: str, tag: str) -> Iterator[Plugins]:
    """New plugins (new names: empty roots, caches and image views); at the end their
    containers and volumes are removed, the plugins stopped and their logs kept."""
    started: list[tuple[Host, HostPlugin]] = []

    def start(host: Host, name: str, host_id: str) -> HostPlugin:
        plugin = host.start_plugin(name, host_id=host_id, store=store)
        started.append((host, plugin))
        return plugin

    try:
        yield Plugins(
            start(a, f"vp-roam{tag}", "host-a"),
            start(b, f"vp-roam{tag}", "host-b"),
            start(b, f"vp-plain{tag}", "host-b"),
        )
    finally:
        for host in (a, b):
            ids = host.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                host.docker("rm", "-f", *ids, check=False)
        for host, plugin in started:  # B first: removing on A deletes the store's record
            volumes = host.docker(
                "volume", "ls", "-q", "--filter", f"driver={plugin.name}", check=False
            ).stdout.split()
            for volume in volumes:
                host.docker("volume", "rm", "-f", volume, check=False)
        logs = WORK / "logs"
        logs.mkdir(exist_ok=True)
        for host, plugin in reversed(started):
            plugin.cleanup()
            host.plugins.remove(plugin)
            with contextlib.suppress(OSError):  # kept for a look at what took the time
                shutil.copyfile(plugin.log_path, logs / f"{host.name}-{plugin.name}.log")


# -- one repetition ----------------------------------------------------------------------------


@dataclass
class NextHost:
    """Part 1 of one repetition (seconds)."""

    a_write_handover: float  # A's `docker run --rm` that wrote the volume, to its exit
    a_unmount: float  # A's Unmount of it: the handover (a full backup in the first rep)
    restore_create: float  # `docker volume create -o from=HEAD` on B's plain plugin
    restore_first: float  # then `docker run` to the first read
    restore_all: float  # first read to the whole volume read
    lazy_first: float  # `docker run` on B to the first read, lazily
    lazy_all: float  # first read to the whole volume read, lazily
    lazy_wall: float  # that `docker run` to its exit (B's own handover included)
    b_mount: float  # B's Mount (plugin's access log): the lease, the lazy overlay
    b_unmount: float  # B's Unmount at that container's exit: B's handover
    b_handover_read: int  # bytes B's handover read
    fill_wait: float  # from that exit until B's fill was done and switched
    filled_first: float  # after the fill: `docker run` to the first read
    filled_all: float  # and to the whole volume read


@dataclass
class Handover:
    """Part 2 of one repetition (seconds)."""

    roaming_first: bool  # whether (a) ran before (b)
    changed_files: int
    changed_bytes: int
    checkpoint_roaming: float
    checkpoint_plain: float
    stop: float  # (a) `docker stop` of the roaming volume's container
    rm: float  # then `docker rm`
    unmount: float  # the plugin's Unmount of the roaming volume (access log)
    unmount_done_at_stop: bool  # its record was there when `docker stop` returned
    plain_backup: float  # (b) /Backup.Create with Wait of the plain volume
    plain_backup_plugin: float  # its duration in the plugin's access log
    handover_read: int  # bytes the handover's backup read
    plain_read: int  # bytes the plain backup read
    b_first: float  # `docker run` on B (right after `docker stop`) to the first read
    end_to_end: float  # from the start of `docker stop` on A to that read on B
    b_wall: float  # that `docker run` on B until it exited (B's handover included)
    b_unmount: float  # B's Unmount at its exit: B's handover (plugin's access log)
    b_handover_read: int  # bytes B's handover read
    b_error: str  # what the docker CLI said if that `docker run` failed


@dataclass
class Rep:
    next_host: NextHost
    handover: Handover


def next_host(a: Host, b: Host, p: Plugins, payload: Payload, rep: int) -> NextHost:
    driver = p.a.name
    vol = f"roam{rep}"
    big = payload.largest()
    docker(a, "volume", "create", "-d", driver, "-o", "roaming=true", vol)
    start = time.perf_counter()
    a.docker(
        "run", "--rm", "--mount", mount_arg(vol, driver), "-v", f"{payload.root}:/payload:ro",
        BASE_IMAGE, "cp", "-a", "/payload/.", "/data/", timeout=TIMEOUT,
    )  # fmt: skip
    a_write = time.perf_counter() - start
    a_unmount = last_ms(p.a, "/VolumeDriver.Unmount", vol)
    head = status(a, vol)["Roaming"]["Head"]
    if head is None or status(a, vol)["Roaming"]["Holder"] is not None:
        raise BenchError(f"{vol} was not handed over by A: {status(a, vol)['Roaming']}")
    os.sync()

    print(f"  rep {rep}: full restore on B ...", file=sys.stderr, flush=True)
    restored = f"restored{rep}"
    create = timed(
        b, "volume", "create", "-d", p.plain_b.name, "-o", f"from={head['Backup']}", restored
    )
    full = timed_run(b, restored, p.plain_b.name, READ_SCRIPT.format(file=big))
    check_read(full, payload, big, "the restored volume")
    verify(b, restored, p.plain_b.name, payload.md5, "the restored volume")
    docker(b, "volume", "rm", restored)

    print(f"  rep {rep}: lazily on B ...", file=sys.stderr, flush=True)
    lazy = timed_run(b, vol, driver, READ_SCRIPT.format(file=big))
    check_read(lazy, payload, big, "the roaming volume on B")
    b_mount = last_ms(p.b, "/VolumeDriver.Mount", vol)
    b_unmount = last_ms(p.b, "/VolumeDriver.Unmount", vol)
    b_read = handover_read(p.b, vol)
    fill_wait = wait_switched(b, vol)
    filled = timed_run(b, vol, driver, READ_SCRIPT.format(file=big))
    check_read(filled, payload, big, "the roaming volume on B after the fill")
    verify(b, vol, driver, payload.md5, "the roaming volume on B")
    for run in (full, lazy, filled):
        if "all" not in run.marks:
            raise BenchError("a container did not read the whole volume")
    return NextHost(
        a_write_handover=a_write,
        a_unmount=a_unmount,
        restore_create=create,
        restore_first=full.marks["first"],
        restore_all=full.marks["all"] - full.marks["first"],
        lazy_first=lazy.marks["first"],
        lazy_all=lazy.marks["all"] - lazy.marks["first"],
        lazy_wall=lazy.wall,
        b_mount=b_mount,
        b_unmount=b_unmount,
        b_handover_read=b_read,
        fill_wait=fill_wait,
        filled_first=filled.marks["first"],
        filled_all=filled.marks["all"] - filled.marks["first"],
    )


def handover(
    a: Host, b: Host, p: Plugins, payload: Payload, rep: int, seed: int, roaming_first: bool
) -> Handover:
    driver = p.a.name
    names = {"roaming": f"hand{rep}", "plain": f"plain{rep}"}
    changes = {  # the same files, different new content
        kind: make_changes(
            payload, WORK / f"changes-{kind}", CHANGED_SHARE, seed * 1000 + rep, seed * 1000 + i
        )
        for i, kind in enumerate(("roaming", "plain"), start=100 + rep * 2)
    }
    # wait: B's Mount waits for A's handover if `docker stop` returns before it is done
    docker(a, "volume", "create", "-d", driver, "-o", "roaming=true", "-o", "wait=90s",
           names["roaming"])  # fmt: skip
    docker(a, "volume", "create", "-d", driver, names["plain"])
    checkpoints = {}
    for kind, vol in names.items():
        a.docker(
            "run", "--rm", "--mount", mount_arg(vol, driver), "-v", f"{payload.root}:/payload:ro",
            BASE_IMAGE, "cp", "-a", "/payload/.", "/data/", timeout=TIMEOUT,
        )  # fmt: skip
        a.docker(
            "run", "-d", "--name", f"hold-{vol}", "--mount", mount_arg(vol, driver),
            "-v", f"{changes[kind].root}:/changes:ro", BASE_IMAGE, "sh", "-c", HOLD_SCRIPT,
        )  # fmt: skip
        checkpoints[kind], _ = backup(p.a, vol)
    for vol in names.values():
        docker(a, "exec", f"hold-{vol}", "cp", "-a", "/changes/.", "/data/")
    os.sync()
    plain_vol, roam_vol = names["plain"], names["roaming"]
    before = status(a, roam_vol)["Roaming"]["Head"]["Backup"]
    rel = sorted(changes["roaming"].files)[0]

    def plain() -> tuple[float, float, dict]:
        seconds, record = backup(p.a, plain_vol)
        return seconds, last_ms(p.a, "/Backup.Create", None), record

    if not roaming_first:
        plain_s, plain_ms, plain_record = plain()
    print(f"  rep {rep}: handover ...", file=sys.stderr, flush=True)
    unmounts = len(access(p.a, "/VolumeDriver.Unmount", roam_vol))
    stop = timed(a, "stop", f"hold-{roam_vol}")
    done_at_stop = len(access(p.a, "/VolumeDriver.Unmount", roam_vol)) > unmounts
    # B's handover at its exit may outlast the daemon's patience: recorded, not fatal
    first = timed_run(b, roam_vol, driver, FIRST_SCRIPT.format(file=rel), check=False)
    rm = timed(a, "rm", f"hold-{roam_vol}")
    check_read(first, changes["roaming"], rel, "the rewritten file on B")
    unmount = last_ms(p.a, "/VolumeDriver.Unmount", roam_vol)
    job = last_backup_job(p.a, roam_vol)  # the handover's
    handed = (job.get("Result") or {}).get("Backup") or {}
    b_unmount = last_ms(p.b, "/VolumeDriver.Unmount", roam_vol, timeout=TIMEOUT)
    if job["State"] != "succeeded" or handed.get("id") == before:
        raise BenchError(f"A published no handover backup of {roam_vol}: {job}")
    if roaming_first:
        wait_switched(b, roam_vol)  # B's fill must not run during (b)
        plain_s, plain_ms, plain_record = plain()
    else:
        wait_switched(b, roam_vol)
    docker(a, "rm", "-f", f"hold-{plain_vol}")
    return Handover(
        roaming_first=roaming_first,
        changed_files=len(changes["roaming"].files),
        changed_bytes=changes["roaming"].total,
        checkpoint_roaming=checkpoints["roaming"],
        checkpoint_plain=checkpoints["plain"],
        stop=stop,
        rm=rm,
        unmount=unmount,
        unmount_done_at_stop=done_at_stop,
        plain_backup=plain_s,
        plain_backup_plugin=plain_ms,
        handover_read=int(handed.get("bytes_read", -1)),
        plain_read=int(plain_record.get("bytes_read", -1)),
        b_first=first.marks["first"],
        end_to_end=stop + first.marks["first"],
        b_wall=first.wall,
        b_error=first.error,
        b_unmount=b_unmount,
        b_handover_read=handover_read(p.b, roam_vol),
    )


# -- the report --------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def each(values: Sequence[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def report(
    args: argparse.Namespace,
    payload: Payload,
    reps: list[Rep],
    loads: list[float],
    load_start: float,
    docker_version: str,
) -> str:
    n = [r.next_host for r in reps]
    h = [r.handover for r in reps]

    def col(values: list[float]) -> list[str]:
        return [f"**{med(values):.2f}**", each(values)]

    restore_total = [x.restore_create + x.restore_first for x in n]
    rows1 = [
        [
            "full restore: `docker volume create -o from=HEAD` on B",
            *col([x.restore_create for x in n]),
        ],
        ["… then `docker run` → first read", *col([x.restore_first for x in n])],
        ["**full restore, total to the first read**", *col(restore_total)],
        ["… first read → whole volume read (restored, local)", *col([x.restore_all for x in n])],
        ["**roaming, lazily: `docker run` on B → first read**", *col([x.lazy_first for x in n])],
        ["… of which B's Mount (plugin's access log)", *col([x.b_mount for x in n])],
        ["… first read → whole volume read (lazily)", *col([x.lazy_all for x in n])],
        [
            "… that `docker run` until the CLI returned (B's Unmount is at the exit)",
            *col([x.lazy_wall for x in n]),
        ],
        ["… B's Unmount at the exit: B's handover", *col([x.b_unmount for x in n])],
        ["… which read (MiB)", *col([x.b_handover_read / 2**20 for x in n])],
        ["… then until B's fill was done and switched", *col([x.fill_wait for x in n])],
        ["roaming, after the fill: `docker run` → first read", *col([x.filled_first for x in n])],
        ["… first read → whole volume read (filled, local)", *col([x.filled_all for x in n])],
        [
            "A: `docker run --rm` writing the volume, until it exited",
            *col([x.a_write_handover for x in n]),
        ],
        ["… of which A's Unmount: the handover", *col([x.a_unmount for x in n])],
    ]
    lazy, full = med([x.lazy_first for x in n]), med(restore_total)
    ratio = med([x.unmount / x.plain_backup for x in h])
    stop_ratio = med([x.stop / x.plain_backup for x in h])
    rows2 = [
        [
            "checkpoint of the roaming volume (/Backup.Create, Wait)",
            *col([x.checkpoint_roaming for x in h]),
        ],
        [
            "checkpoint of the plain volume (/Backup.Create, Wait)",
            *col([x.checkpoint_plain for x in h]),
        ],
        ["(a) `docker stop` of the roaming volume's container", *col([x.stop for x in h])],
        ["(a) … the plugin's Unmount: the handover (access log)", *col([x.unmount for x in h])],
        ["(a) `docker rm` after it", *col([x.rm for x in h])],
        [
            "**(b) plain incremental backup (/Backup.Create, Wait)**",
            *col([x.plain_backup for x in h]),
        ],
        [
            "**ratio (a) Unmount / (b)**",
            f"**{ratio:.2f}×**",
            each([x.unmount / x.plain_backup for x in h]),
        ],
        [
            "ratio (a) `docker stop` / (b)",
            f"{stop_ratio:.2f}×",
            each([x.stop / x.plain_backup for x in h]),
        ],
        [
            "B: `docker run` right after that `docker stop` → first read of a rewritten file",
            *col([x.b_first for x in h]),
        ],
        ["**end to end: `docker stop` on A → first read on B**", *col([x.end_to_end for x in h])],
        [
            "B: that `docker run` until the CLI returned (B's Unmount is at the exit)",
            *col([x.b_wall for x in h]),
        ],
        ["… B's Unmount at the exit: B's handover", *col([x.b_unmount for x in h])],
        ["… which read (MiB)", *col([x.b_handover_read / 2**20 for x in h])],
    ]
    changed = h[0]
    done_at_stop = sum(x.unmount_done_at_stop for x in h)
    source = "a private Ceph cluster (memstore)" if not args.shared_ceph else "the tests' Ceph RGW"
    largest = payload.largest()
    parts = [
        "## bench_roaming: roaming volumes between two hosts",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {environment_summary(load_start)}; 1-min load at the start of each "
        f'repetition: {each(loads, 1)}. Docker {docker_version}: two dockerd "hosts" in '
        "namespaces of their own on this one machine (tests/support/hosts.py), one "
        f"`volplugin serve` per host and driver, an encrypted store in a bucket of {source} "
        "on 127.0.0.1 (the tests' weak KDF). Each part of each repetition starts new "
        "plugins (empty roots, caches and image views) and uses new volume names; the "
        "volumes' content is the same everywhere (so A's handover uploads it only in the "
        "first repetition; B's caches never hold it). The page cache is not dropped.",
        "",
        f"### 1. Host B reads a volume last written on host A: {human_bytes(payload.total)} "
        f"in {len(payload.files)} files of random bytes (1 KiB to "
        f"{human_bytes(payload.files[largest])})",
        "",
        "The container on B: `sh -c 'echo first $(head -c 4096 /data/F | md5sum); find "
        "/data -type f | xargs cat > /dev/null; echo all'`, F the largest file, timed from "
        "the start of `docker run --rm` to each line as the docker CLI printed it. Full "
        "restore is what a user does without roaming, on a second plugin of B (the same "
        "code, its own empty cache): `docker volume create -d PLAIN -o from=HEAD restored`, "
        "then the container. Every first read returned A's bytes, and every file of the "
        "restored and the roaming volume on B matched A's (md5sum, untimed).",
        "",
        markdown_table(["seconds", "median", "each repetition"], rows1),
        "",
        f"Target: `docker run` on B → first read <= {FIRST_READ_TARGET:.0f} s: "
        f"**{lazy:.2f} s, {verdict(lazy, FIRST_READ_TARGET)}**; a full restore takes "
        f"{full:.2f} s to the same read (lazily / full restore: {lazy / full:.2f}×).",
        "",
        f"### 2. The handover with {CHANGED_SHARE:.0%} changed since the last checkpoint",
        "",
        f"Two volumes of A's plugin with the same {human_bytes(payload.total)} content, one "
        "roaming, one plain, each mounted by a running container; a checkpoint of each, "
        f"then `docker exec` rewrote the same {changed.changed_files} files in each "
        f"({human_bytes(changed.changed_bytes)}, {changed.changed_bytes / payload.total:.1%} "
        "of the bytes; new random content, different for the two volumes) and the page "
        "cache was synced. (a) and (b) took turns going first. The handover's backup read "
        f"{each([x.handover_read / 2**20 for x in h], 1)} MiB, the plain backup "
        f"{each([x.plain_read / 2**20 for x in h], 1)} MiB. The Unmount had ended when "
        f"`docker stop` returned in {done_at_stop} of {len(h)} repetitions.",
        "",
        markdown_table(["seconds", "median", "each repetition"], rows2),
        "",
        f"Target: handover <= {HANDOVER_TARGET}× a plain incremental backup of the same "
        f"change: **{ratio:.2f}×, {verdict(ratio, HANDOVER_TARGET)}** (the plugin's Unmount; "
        f"`docker stop`{', which returned after it,' if done_at_stop == len(h) else ''} "
        f"{stop_ratio:.2f}×).",
    ]
    return "\n".join(parts)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=parse_size, default=parse_size("1G"), help="volume size (default 1G)"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the content")
    parser.add_argument("--shared-ceph", action="store_true", help="use the tests' RGW")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.size < 1 << 20:
        parser.error("--size must be at least 1M")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_root()
    require_tools("docker", "dockerd", "nsenter", "unshare", "radosgw")
    load_start = os.getloadavg()[0]
    compile_bytecode()
    prepare_environment()
    print(f"writing {human_bytes(args.size)} of files ...", file=sys.stderr, flush=True)
    payload = make_payload(WORK / "payload", args.size, args.seed)
    os.sync()
    reps: list[Rep] = []
    loads: list[float] = []
    try:
        with rgw(args.shared_ceph, args.size) as s3:
            bucket = ceph.new_bucket(s3, "roam")
            try:
                with two_hosts() as (a, b):
                    version = docker(a, "version", "--format", "{{.Server.Version}}").strip()
                    for rep in range(args.reps):
                        loads.append(os.getloadavg()[0])
                        print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
                        store = f"s3://{bucket}/store"
                        with plugins(a, b, store, f"{rep}n") as p:
                            first = next_host(a, b, p, payload, rep)
                        print(f"  {first}", file=sys.stderr, flush=True)
                        with plugins(a, b, store, f"{rep}h") as p:  # B's cache empty again
                            hand = handover(a, b, p, payload, rep, args.seed, rep % 2 == 0)
                        print(f"  {hand}", file=sys.stderr, flush=True)
                        reps.append(Rep(first, hand))
            finally:
                ceph.remove_bucket(s3, bucket)
    finally:
        for scratch in ("payload", "changes-roaming", "changes-plain"):
            shutil.rmtree(WORK / scratch, ignore_errors=True)
    text = report(args, payload, reps, loads, load_start, version)
    result = {
        "command": command_line(),
        "size": payload.total,
        "files": len(payload.files),
        "loads": loads,
        "reps": [asdict(r) for r in reps],
    }
    (WORK / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(text)
    if not args.no_write:
        write_section("roaming", text)


if __name__ == "__main__":
    main()

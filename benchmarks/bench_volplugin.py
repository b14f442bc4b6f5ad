"""What users feel of volplugin: concurrent `docker run` on its volumes against `local`.

Three measurements in one run, on a real `volplugin serve` (its defaults, its own root
under benchmarks/work/volplugin, its socket in /run/docker/plugins where the daemon finds
it) and the real Docker daemon:

1. Batches of ROUNDS concurrent rounds, each on a volume of its own: `docker volume
   create -d DRIVER VOL`; once every volume of the batch exists, `docker run --rm -v
   VOL:/d IMAGE true`, all at once; then `docker volume rm VOL`. The `docker run` of each
   round is timed, and the batch from the start of its first `docker run` to the end of
   its last. REPEATS batches per driver, the plugin and `local` taking turns (the first
   driver alternates), after an untimed warm-up batch of each. Reported: median, p90 and
   p99 of the rounds' `docker run`, the median batch, and the ratio plugin/local (target
   <= 1.1x).
2. The plugin's own answer times during its batches, by endpoint, from its access log
   (one JSON line per request on the `volplugin.access` logger, with `duration_ms`).
3. The CLI's start time: `volplugin --help` and one call on the plugin's volumes
   (`volplugin --name NAME ls` when `ls` asks the plugin over its socket, else
   `volplugin --root ROOT ls`, which reads the state database), median of CLI_RUNS runs
   each (target 0.15 s).

And, for information only: a closed-loop request load straight on the plugin's socket
(CLIENTS clients in one process, each posting Get, Mount, Unmount, List REQUESTS times;
benchmarks.plugin_load); `--clients 0` skips it. The CLI and this load run before the
batches, not on a machine still busy with the end of the last one.

The image is the tests' busybox base (`docker import` of Debian's static busybox,
tests/support/dockerenv.py), imported if missing. The shared daemon keeps every legacy
volume driver it has talked to and keeps calling it, with seconds of retries, once the
plugin is gone: hence one fixed plugin name (`--name`, default vp-bench) for every run,
and `--private-dockerd` (a dockerd of the same binary with its own data root,
tests/support/private_dockerd.py) for runs on a machine others are using. The plugin and
the CLI run this checkout's code (its root is put first on PYTHONPATH).

    .venv/bin/python -m benchmarks.bench_volplugin                # 50 rounds x 3 batches
    .venv/bin/python -m benchmarks.bench_volplugin --rounds 10 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    REPO_DIR,
    WORK_DIR,
    BenchError,
    command_line,
    compile_bytecode,
    environment_summary,
    markdown_table,
    require_root,
    require_tools,
    write_section,
)
from benchmarks.plugin_load import VOLUME, LoadResult, asyncio_load, percentile
from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import ACCESS_MARK, VOLPLUGIN, PluginProcess

PLUGIN_NAME = "vp-bench"
PREFIX = "vp-bench-"  # every volume this benchmark creates
PROBE = "vp-bench-probe"  # the volume the CLI lists
WARMUP_ROUNDS = 5
RATIO_TARGET = 1.1
CLI_TARGET = 0.15
TIMEOUT = 600.0  # seconds for one docker command under a batch's load


@dataclass
class Docker:
    """The docker CLI against one daemon."""

    env: dict[str, str]
    label: str

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["docker", *args], capture_output=True, text=True, env=self.env, timeout=TIMEOUT
        )
        if check and proc.returncode != 0:
            raise BenchError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc


@dataclass
class Round:
    """One round's times in seconds; run_start/run_end on the perf_counter clock."""

    create: float
    run: float
    remove: float
    run_start: float
    run_end: float


@dataclass
class Batch:
    """ROUNDS concurrent rounds on one driver; `log` the plugin log's bytes written meanwhile."""

    driver: str  # "local" or "volplugin"
    rounds: list[Round]
    log: tuple[int, int] = (0, 0)

    @property
    def wall(self) -> float:
        """From the start of the first `docker run` to the end of the last."""
        return max(r.run_end for r in self.rounds) - min(r.run_start for r in self.rounds)


@dataclass
class CliTiming:
    """Wall times of one command line; `label` names it in the report."""

    label: str
    command: list[str]
    seconds: list[float] = field(default_factory=list)


# -- the daemon, the image, the plugin -------------------------------------------------------


@contextlib.contextmanager
def docker_daemon(private: bool) -> Iterator[Docker]:
    """The shared daemon (default socket) or a private dockerd, with the busybox image."""
    if private:
        from tests.support.private_dockerd import private_dockerd

        with private_dockerd() as daemon:  # imports the busybox base
            yield Docker(daemon.env, "a private dockerd")
        return
    import docker

    from tests.support.dockerenv import ensure_busybox_image

    env = dict(os.environ)
    Docker(env, "")("version")
    client = docker.from_env()
    try:
        ensure_busybox_image(client)
    finally:
        client.close()
    yield Docker(env, "the shared dockerd (default socket)")


def plugin_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for the plugin and the CLI: this checkout first on PYTHONPATH, and a backup
    store of the benchmark's own (an encrypted repository under benchmarks/work/volplugin,
    with a password file made once), which serve opens at start."""
    work = WORK_DIR / "volplugin"
    work.mkdir(parents=True, exist_ok=True)
    password = work / "password"
    if not password.exists():
        password.write_text(secrets.token_hex(16) + "\n")
        password.chmod(0o600)
    paths = [str(REPO_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    out = dict(env, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    out.update(LAYERFS_STORE=str(work / "store"), LAYERFS_PASSWORD_FILE=str(password))
    for name in ("VOLPLUGIN_ROOT", "VOLPLUGIN_NAME", "LAYERFS_PASSWORD_COMMAND"):
        out.pop(name, None)
    return out


def start_plugin(name: str, env: dict[str, str]) -> PluginProcess:
    """`volplugin serve` with its defaults, on a fresh root under benchmarks/work/volplugin."""
    work = WORK_DIR / "volplugin"
    shutil.rmtree(work / "root", ignore_errors=True)
    (work / f"{name}.log").unlink(missing_ok=True)
    if (Path("/run/docker/plugins") / f"{name}.sock").exists():
        raise BenchError(
            f"/run/docker/plugins/{name}.sock exists: another run (or a crashed one) uses "
            f"the name {name}; pick another with --name, or remove the socket if none runs"
        )
    return PluginProcess(work / "root", name, env=env).start()


def same_disk(docker: Docker, root: Path) -> bool:
    """Whether `root` is on the file system of the daemon's data root."""
    data_root = docker("info", "--format", "{{.DockerRootDir}}").stdout.strip()
    return os.stat(data_root).st_dev == os.stat(root).st_dev


def remove_volumes(docker: Docker) -> None:
    """Remove every volume this benchmark created (of any driver)."""
    names = docker("volume", "ls", "-q", "--filter", f"name={PREFIX}", check=False).stdout.split()
    ours = [n for n in names if n.startswith(PREFIX)]
    if ours:
        docker("volume", "rm", "-f", *ours, check=False)


# -- the docker rounds ------------------------------------------------------------------------


def one_round(
    docker: Docker, driver: str, volume: str, image: str, gate: threading.Barrier
) -> Round:
    try:
        start = time.perf_counter()
        docker("volume", "create", "-d", driver, volume)
        created = time.perf_counter()
        gate.wait()
        run_start = time.perf_counter()
        docker("run", "--rm", "-v", f"{volume}:/d", image, "true")
        run_end = time.perf_counter()
        docker("volume", "rm", volume)
        removed = time.perf_counter()
    except BaseException:
        gate.abort()
        raise
    return Round(created - start, run_end - run_start, removed - run_end, run_start, run_end)


def batch(docker: Docker, driver: str, label: str, rounds: int, image: str, tag: str) -> Batch:
    """`rounds` concurrent rounds of create, run (all at once), rm on `driver`."""
    gate = threading.Barrier(rounds, timeout=TIMEOUT)
    with ThreadPoolExecutor(max_workers=rounds) as pool:
        futures = [
            pool.submit(one_round, docker, driver, f"{PREFIX}{tag}-{label}-{i}", image, gate)
            for i in range(rounds)
        ]
        errors = [e for e in (f.exception() for f in futures) if e]
    if errors:  # the round that failed, not the ones it stopped at the barrier
        cause = (e for e in errors if not isinstance(e, threading.BrokenBarrierError))
        raise next(cause, errors[0])
    return Batch(label, [f.result() for f in futures])


def docker_batches(
    docker: Docker, plugin: PluginProcess, args: argparse.Namespace, image: str
) -> list[Batch]:
    """A warm-up batch of each driver, then args.repeats of each, taking turns."""
    docker("run", "--rm", image, "true")
    drivers = [("local", "local"), (plugin.name, "volplugin")]
    warmup = min(WARMUP_ROUNDS, args.rounds)
    for driver, label in drivers:
        batch(docker, driver, label, warmup, image, "warmup")
    batches = []
    for r in range(args.repeats):
        for driver, label in drivers if r % 2 == 0 else drivers[::-1]:
            before = plugin.log_path.stat().st_size
            done = batch(docker, driver, label, args.rounds, image, f"r{r}")
            done.log = (before, plugin.log_path.stat().st_size)
            batches.append(done)
            print(f"  batch {r + 1}/{args.repeats} {label}: {done.wall:.2f} s", file=sys.stderr)
    return batches


def access_records(log_path: Path, spans: Sequence[tuple[int, int]]) -> list[dict]:
    """The plugin's access-log records written within the byte spans of its log."""
    data = log_path.read_bytes()
    return [
        json.loads(line.split(ACCESS_MARK, 1)[1])
        for start, end in spans
        for line in data[start:end].decode(errors="replace").splitlines()
        if ACCESS_MARK in line
    ]


# -- the CLI ------------------------------------------------------------------------------------


def ls_timing(plugin: PluginProcess, env: dict[str, str]) -> CliTiming:
    """`volplugin --name N ls` if it lists the plugin's volumes (through its socket: the
    default root is not the plugin's), else `volplugin --root R ls` (the state database)."""
    plugin.call("VolumeDriver.Create", {"Name": PROBE})
    candidates = [
        CliTiming(f"`volplugin --name {plugin.name} ls`", [VOLPLUGIN, "--name", plugin.name, "ls"]),
        CliTiming("`volplugin --root ROOT ls`", [VOLPLUGIN, "--root", str(plugin.root), "ls"]),
    ]
    for timing in candidates:
        proc = subprocess.run(timing.command, capture_output=True, text=True, env=env, timeout=60)
        if proc.returncode == 0 and PROBE in proc.stdout:
            return timing
    raise BenchError(f"neither `volplugin --name N ls` nor `--root R ls` listed {PROBE}")


def time_cli(timing: CliTiming, env: dict[str, str], runs: int) -> CliTiming:
    """Wall time of `runs` runs of the command, after one untimed run."""
    for i in range(runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(timing.command, capture_output=True, env=env, timeout=60)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"{timing.label} failed: {proc.stderr.decode(errors='replace')}")
        if i:
            timing.seconds.append(elapsed)
    return timing


# -- the information-only request load ------------------------------------------------------------


def request_load(plugin: PluginProcess, clients: int, requests: int) -> LoadResult:
    assert plugin.proc is not None
    plugin.call("VolumeDriver.Create", {"Name": VOLUME})
    result = asyncio_load(str(plugin.socket), plugin.proc.pid, clients, requests)
    status, answer = plugin.call("VolumeDriver.Get", {"Name": VOLUME})
    held = answer.get("Volume", {}).get("Status", {}).get("Containers")
    if status != 200 or held != 0:
        raise BenchError(f"after the load, {VOLUME} is held by {held} mount(s): {answer}")
    plugin.call("VolumeDriver.Remove", {"Name": VOLUME})
    return result


# -- the report ----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def report(
    args: argparse.Namespace,
    docker: Docker,
    batches: list[Batch],
    records: list[dict],
    local_records: int,
    cli: list[CliTiming],
    same_disk: bool,
    load: LoadResult | None,
    load_avg: float,
) -> str:
    def of(label: str) -> list[Batch]:
        return [b for b in batches if b.driver == label]

    stats: dict[str, dict[str, float]] = {}
    rows = []
    for label in ("local", "volplugin"):
        runs = [r.run for b in of(label) for r in b.rounds]
        stats[label] = {
            "median": statistics.median(runs),
            "p90": percentile(runs, 0.90),
            "p99": percentile(runs, 0.99),
            "batch": statistics.median(b.wall for b in of(label)),
            "create": statistics.median(r.create for b in of(label) for r in b.rounds),
            "remove": statistics.median(r.remove for b in of(label) for r in b.rounds),
        }
        s = stats[label]
        each = ", ".join(f"{b.wall:.2f}" for b in of(label))
        rows.append(
            [label, ms(s["median"]), ms(s["p90"]), ms(s["p99"]), f"**{s['batch']:.2f}**", each]
            + [ms(s["create"]), ms(s["remove"])]
        )
    ours, local = stats["volplugin"], stats["local"]
    rows.append(
        ["**volplugin / local**"]
        + [f"**{ratio(ours[k], local[k])}**" for k in ("median", "p90", "p99", "batch")]
        + ["", ratio(ours["create"], local["create"]), ratio(ours["remove"], local["remove"])]
    )
    rounds_table = markdown_table(
        [
            "driver",
            "docker run median ms",
            "p90 ms",
            "p99 ms",
            "batch s (median)",
            "batch s, each run",
            "volume create median ms",
            "volume rm median ms",
        ],
        rows,
    )
    run_ratio = ours["median"] / local["median"]
    batch_ratio = ours["batch"] / local["batch"]

    by_endpoint: dict[str, list[dict]] = {}
    for rec in records:
        by_endpoint.setdefault(rec["endpoint"].lstrip("/"), []).append(rec)

    def endpoint_row(name: str, recs: list[dict]) -> list[str]:
        values = [rec["duration_ms"] for rec in recs]
        errors = sum(1 for rec in recs if rec.get("outcome") != "ok")
        return [name, str(len(values)), str(errors)] + [
            f"{x:.1f}"
            for x in (
                percentile(values, 0.5),
                percentile(values, 0.9),
                percentile(values, 0.99),
                max(values),
            )
        ]

    endpoint_table = markdown_table(
        ["endpoint", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"],
        [endpoint_row(name, by_endpoint[name]) for name in sorted(by_endpoint)]
        + ([endpoint_row("**all**", records)] if records else []),
    )

    cli_table = markdown_table(
        ["command", "median s", "min s", "max s", f"target <= {CLI_TARGET} s"],
        [
            [
                t.label,
                f"**{statistics.median(t.seconds):.3f}**",
                f"{min(t.seconds):.3f}",
                f"{max(t.seconds):.3f}",
                verdict(statistics.median(t.seconds), CLI_TARGET),
            ]
            for t in cli
        ],
    )

    server = docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    parts = [
        "## volplugin (Docker volume plugin)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"{environment_summary(load_avg)}; {docker.label}, Docker {server}; "
        "`volplugin serve` with its defaults (one process, waitress threads), its root on "
        f"{'the same' if same_disk else 'another'} file system {'as' if same_disk else 'than'} "
        "Docker's data root.",
        "",
        f"{args.repeats} batch{'es' if args.repeats > 1 else ''} per driver, taking turns, "
        f"of {args.rounds} concurrent "
        "rounds each on a volume of its own: `docker volume create -d DRIVER VOL`, then, "
        "once every volume of the batch exists, all the batch's `docker run --rm -v "
        f"VOL:/d {BASE_IMAGE} true` at once, each followed by its `docker volume rm VOL`. "
        "The batch time runs from the start of its first `docker run` to the end of its "
        "last; the percentiles are over every round of the driver's batches.",
        "",
        rounds_table,
        "",
        f"Target volplugin/local <= {RATIO_TARGET}x: median `docker run` "
        f"**{run_ratio:.2f}x, {verdict(run_ratio, RATIO_TARGET)}**; median batch "
        f"**{batch_ratio:.2f}x, {verdict(batch_ratio, RATIO_TARGET)}**.",
        "",
        "The plugin's answer times during its batches, by endpoint, from its access log "
        f"({local_records} requests reached it during the `local` batches). The daemon asks "
        "Get of a volume before creating it, which answers an error:",
        "",
        endpoint_table,
        "",
        f"CLI start, median of {args.cli_runs} runs each after one untimed run (wall time of "
        "the whole command, before the batches, the plugin idle):",
        "",
        cli_table,
    ]
    if load is not None:
        load_rows = [
            [name, f"{load.p(0.5, name):.1f}", f"{load.p(0.99, name):.1f}"]
            for name in sorted(load.by_endpoint)
        ]
        load_rows.append(["**all**", f"{load.p(0.5):.1f}", f"{load.p(0.99):.1f}"])
        parts += [
            "",
            f"For information (no target): before the batches, a closed-loop load straight "
            "on the socket, "
            f"{args.clients} clients in one process each posting Get, Mount, Unmount, List "
            f"{args.requests} times in order on one keep-alive connection "
            f"({len(load.samples)} requests): {load.per_second:.0f} requests/s, "
            f"{load.cpu_ms_per_request:.2f} ms of server CPU per request.",
            "",
            markdown_table(["endpoint", "p50 ms", "p99 ms"], load_rows),
        ]
    return "\n".join(parts)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="concurrent rounds per batch")
    parser.add_argument("--repeats", type=int, default=3, help="batches per driver")
    parser.add_argument("--cli-runs", type=int, default=10, help="timed runs of each command")
    parser.add_argument(
        "--clients", type=int, default=20, help="clients of the socket load (0: skip it)"
    )
    parser.add_argument(
        "--requests", type=int, default=25, help="rounds of 4 calls per client of that load"
    )
    parser.add_argument(
        "--name", default=PLUGIN_NAME, help=f"plugin (driver) name (default {PLUGIN_NAME})"
    )
    parser.add_argument(
        "--private-dockerd",
        action="store_true",
        help="a dockerd of its own instead of the shared one (leaves it no dead driver)",
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not edit RESULTS.md")
    args = parser.parse_args(argv)
    for name in ("rounds", "repeats", "cli_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.name.startswith("vp-"):
        parser.error("--name must start with vp- (plugin sockets share /run/docker/plugins)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_root()
    require_tools("docker", "dockerd")
    load_avg = os.getloadavg()[0]
    compile_bytecode()
    with docker_daemon(args.private_dockerd) as docker:
        env = plugin_env(docker.env)
        plugin = start_plugin(args.name, env)
        try:
            # the CLI and the socket load first, on a machine not busy with the batches' end
            cli = [
                time_cli(
                    CliTiming("`volplugin --help`", [VOLPLUGIN, "--help"]), env, args.cli_runs
                ),
                time_cli(ls_timing(plugin, env), env, args.cli_runs),
            ]
            plugin.call("VolumeDriver.Remove", {"Name": PROBE})
            load = request_load(plugin, args.clients, args.requests) if args.clients else None
            batches = docker_batches(docker, plugin, args, BASE_IMAGE)
            local_spans = [b.log for b in batches if b.driver == "local"]
            plugin_spans = [b.log for b in batches if b.driver == "volplugin"]
            records = access_records(plugin.log_path, plugin_spans)
            local_records = len(access_records(plugin.log_path, local_spans))
            same = same_disk(docker, plugin.root)
            text = report(args, docker, batches, records, local_records, cli, same, load, load_avg)
        finally:
            remove_volumes(docker)  # the plugin's too: the daemon lists them
            plugin.cleanup()
    print(text)
    if not args.no_write:
        write_section("volplugin", text)


if __name__ == "__main__":
    main()

"""Benchmark volplugin against Docker's built-in `local` volume driver.

Part 1, side by side in one run: ROUNDS rounds of `docker volume create`, `docker run
--rm -v VOL:/d busybox true`, `docker volume rm`, alternating the driver each round.
Part 2: the plugin's own request latency (p50, p99) under CLIENTS concurrent clients
posting Get / Mount / Unmount / List straight to its socket in a closed loop
(benchmarks.plugin_load): from one process holding all the connections, as the daemon
does, on which the target is judged; from one curl process per client; and from Python
client processes. Beside it, in the same run, the floor: a minimal Flask app served
the same way (benchmarks.flask_floor), both again with `--cpu-affinity off`, and
`volplugin serve` in other layouts of processes and threads (--layouts). The loads run
REPEATS times, the servers taking turns, and each server's run with the median p99 is
reported: this machine's speed drifts within minutes.

Runs on a private dockerd (same binary as the shared one) so that the short-lived
driver is not left behind in the shared daemon. Writes its section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_volplugin.py [--rounds 50] [--clients 20]
        [--repeats 5] [--layouts 2x8 4x2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from volplugin.affinity import CHECK_SECONDS  # noqa: E402
from volplugin.workers import default_workers  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BenchError,
    command_line,
    environment_summary,
    markdown_table,
    process_tree,
    write_section,
)
from benchmarks.plugin_load import (  # noqa: E402
    VOLUME,
    LoadResult,
    asyncio_load,
    curl_load,
    python_load,
)
from tests.support.dockerenv import BASE_IMAGE  # noqa: E402
from tests.support.plugin import PluginProcess, post, remove_driver_objects  # noqa: E402
from tests.support.private_dockerd import private_dockerd  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402
from volplugin.server import DEFAULT_THREADS  # noqa: E402


def docker_rounds(daemon, drivers: list[str], rounds: int) -> dict[str, float]:
    totals = dict.fromkeys(drivers, 0.0)
    for i in range(rounds):
        order = drivers if i % 2 == 0 else list(reversed(drivers))
        for driver in order:
            vol = f"vp-bench-{i}-{'local' if driver == 'local' else 'plugin'}"
            start = time.perf_counter()
            daemon.docker("volume", "create", "-d", driver, vol)
            daemon.docker("run", "--rm", "-v", f"{vol}:/d", BASE_IMAGE, "true")
            daemon.docker("volume", "rm", vol)
            totals[driver] += time.perf_counter() - start
    return totals


def _answers(sock: Path) -> bool:
    try:
        return post(str(sock), "Plugin.Activate")[0] == 200
    except OSError:
        return False


@contextmanager
def flask_floor(sock: Path, affinity: str = "auto") -> Iterator[int]:
    """Run benchmarks.flask_floor on `sock` in volplugin's default layout; yield its PID."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.flask_floor", str(sock)]
        + ["--workers", str(default_workers()), "--threads", str(DEFAULT_THREADS)]
        + ["--cpu-affinity", affinity],
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(sock), "the Flask floor server", timeout=30)
        time.sleep(0.5)  # its other processes
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        sock.unlink(missing_ok=True)


def parse_layout(text: str) -> tuple[int, int]:
    """`WORKERSxTHREADS`, e.g. 2x8."""
    try:
        workers, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layout {text!r} is not WORKERSxTHREADS, e.g. 2x8"
        ) from None
    return workers, threads


def median_by_p99(results: list[LoadResult]) -> LoadResult:
    return sorted(results, key=lambda r: r.p(0.99))[len(results) // 2]


def load_runs(
    plugin: PluginProcess, tmp: Path, args: argparse.Namespace, env: dict[str, str]
) -> tuple[dict[str, list[LoadResult]], dict[str, int]]:
    """The Python loads on `plugin`; then the other loads, servers taking turns.

    Keys: "single", "python" (one run each, on `plugin`); args.repeats runs each of
    "plugin" (a server of its own with the defaults), "floor", "unpinned" and
    "floor-unpinned" (--cpu-affinity off) and one "WxT" per extra layout (the
    one-process load), and of "curl" and "curl-floor" (one curl per client), on the
    unpinned servers: twenty client processes crowd every CPU, so a server with the
    defaults lets go of its CPUs under them, and stays so for 30 s (volplugin.affinity).
    Also returned: in how many runs each server with the defaults ("plugin", "floor")
    had all its threads on one CPU each after the load.
    """
    assert plugin.proc is not None
    clients, rounds = args.clients, args.requests
    runs: dict[str, list[LoadResult]] = {
        "single": [python_load(str(plugin.socket), plugin.proc.pid, 1, rounds * 4)],
        "python": [python_load(str(plugin.socket), plugin.proc.pid, clients, rounds)],
    }
    check_released(str(plugin.socket))
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, int]] = {}
        for key, affinity in (("floor", "auto"), ("floor-unpinned", "off")):
            sock = tmp / f"{key}.sock"
            servers[key] = (str(sock), stack.enter_context(flask_floor(sock, affinity)))
        others = {"plugin": (), "unpinned": ("--cpu-affinity", "off")}
        for workers, threads in args.layouts:
            others[f"{workers}x{threads}"] = ("--workers", str(workers), "--threads", str(threads))
        for key, serve_args in others.items():
            other = PluginProcess(tmp / f"root-{key}", env=env, args=serve_args).start()
            stack.callback(other.cleanup)
            assert other.proc is not None
            post(str(other.socket), "VolumeDriver.Create", {"Name": VOLUME})
            servers[key] = (str(other.socket), other.proc.pid)
        loads = {key: (asyncio_load, server) for key, server in servers.items()}
        loads["curl"] = (curl_load, servers["unpinned"])
        loads["curl-floor"] = (curl_load, servers["floor-unpinned"])
        kept = {"plugin": 0, "floor": 0}
        for _ in range(args.repeats):
            for key, (load, (path, server_pid)) in loads.items():
                # A pinned server that starts work while the previous server's load still
                # falls in its check counts that load as other work on its CPU and lets
                # go of it (volplugin.affinity): one server per host never sees that.
                time.sleep(CHECK_SECONDS + 0.5)
                runs.setdefault(key, []).append(load(path, server_pid, clients, rounds))
                if "floor" not in key:
                    check_released(path)
                if key in kept:
                    kept[key] += keeps_to_cpus(server_pid)
    return runs, kept


def keeps_to_cpus(pid: int) -> bool:
    """Whether every thread of `pid` and of its child processes may run on one CPU only."""
    return all(
        len(os.sched_getaffinity(int(tid))) == 1
        for p in process_tree(pid)
        for tid in os.listdir(f"/proc/{p}/task")
    )


def check_released(sock: str) -> None:
    """Every client unmounted what it mounted: the load must leave no mount ID behind."""
    status, answer = post(sock, "VolumeDriver.Get", {"Name": VOLUME})
    held = answer.get("Volume", {}).get("Status", {}).get("Containers")
    if status != 200 or held != 0:
        raise BenchError(f"after the load, {VOLUME} is held by {held} mount(s): {answer}")


def report(
    args: argparse.Namespace,
    totals: dict[str, float],
    runs: dict[str, list[LoadResult]],
    kept: dict[str, int],
    load: float,
) -> str:
    local, ours = totals["local"], totals["plugin"]
    ratio = ours / local
    judged, target = median_by_p99(runs["plugin"]), 20.0
    p99, unpinned = judged.p(0.99), median_by_p99(runs["unpinned"]).p(0.99)
    workers = default_workers()

    def row(label: str, server: str, key: str) -> list[str]:
        r = median_by_p99(runs[key])
        every = ", ".join(f"{x.p(0.99):.1f}" for x in runs[key])
        return [
            label,
            server,
            f"{r.p(0.50):.1f}",
            f"**{r.p(0.99):.1f}**",
            every,
            f"{r.mean_ms:.1f}",
            f"{r.per_second:.0f}",
            f"{r.cpu_ms_per_request:.2f}",
            f"{r.client_cpu_ms_per_request:.2f}",
        ]

    n = args.clients
    default = f"{workers}x{DEFAULT_THREADS}"
    one = f"1 process, {n} connections"
    curls = f"{n} curl processes"
    floor = f"minimal Flask app, floor ({default})"
    latency = markdown_table(
        [
            "client",
            "server (processes x threads)",
            "p50 ms",
            "p99 ms",
            "p99 of each run",
            "mean ms",
            "requests/s",
            "server CPU ms/request",
            "client CPU ms/request",
        ],
        [
            row(one, f"volplugin, defaults ({default})", "plugin"),
            row(one, f"volplugin, --cpu-affinity off ({default})", "unpinned"),
            *(
                row(one, f"volplugin, --workers {w} --threads {t} ({w}x{t})", f"{w}x{t}")
                for w, t in args.layouts
            ),
            row(one, floor, "floor"),
            row(one, f"{floor}, --cpu-affinity off", "floor-unpinned"),
            row(curls, f"volplugin, --cpu-affinity off ({default})", "curl"),
            row(curls, f"{floor}, --cpu-affinity off", "curl-floor"),
            row(f"{n} Python processes", f"volplugin ({default})", "python"),
            row("1 Python process, 1 connection", f"volplugin ({default})", "single"),
        ],
    )
    endpoints = markdown_table(
        ["endpoint", "p50 ms", "p99 ms"],
        [
            [name, f"{judged.p(0.50, name):.1f}", f"{judged.p(0.99, name):.1f}"]
            for name in sorted(judged.by_endpoint)
        ],
    )
    return "\n".join(
        [
            "## volplugin (Docker volume plugin)",
            "",
            f"Command: `{command_line()}`",
            "",
            environment_summary(load)
            + "; a private dockerd "
            + subprocess.run(
                ["dockerd", "--version"], capture_output=True, text=True
            ).stdout.strip()
            + ".",
            "",
            f"{args.rounds} rounds of volume create + `docker run --rm -v VOL:/d busybox true` "
            "+ volume rm, drivers alternating:",
            "",
            markdown_table(
                ["driver", "total (s)", "per round (ms)"],
                [
                    ["local", f"{local:.2f}", f"{local / args.rounds * 1000:.0f}"],
                    ["volplugin", f"{ours:.2f}", f"{ours / args.rounds * 1000:.0f}"],
                ],
            ),
            "",
            f"Ratio volplugin/local: **{ratio:.2f}x** (target <= 1.2x: "
            f"{'met' if ratio <= 1.2 else 'NOT met'}).",
            "",
            f"Request latency, closed loop: each client posts Get, Mount, Unmount, List "
            f"{args.requests} times in order on one keep-alive connection "
            f"({n * args.requests * 4} requests per load). All but the Python loads ran "
            f"{args.repeats} times, the servers taking turns; each row shows the run with "
            "the median p99. Client CPU is the load generator's own. After the load, the "
            f"processes of the servers with the defaults were each on one CPU in "
            f"{kept['plugin']} of {args.repeats} runs (volplugin) and {kept['floor']} of "
            f"{args.repeats} (floor); the curl loads, which crowd every CPU, ran on the "
            "servers with `--cpu-affinity off`.",
            "",
            latency,
            "",
            f"Target p99 <= {target:.0f} ms under {n} concurrent clients, judged on one "
            f"client process holding {n} connections, as the daemon does: "
            f"**{p99:.1f} ms, {'met' if p99 <= target else 'NOT met'}** with the defaults "
            "(`--cpu-affinity auto`: each serving process keeps to a CPU of its own while "
            f"that CPU has room); {unpinned:.1f} ms "
            f"({'met' if unpinned <= target else 'NOT met'}) with `--cpu-affinity off`.",
            "",
            "volplugin by endpoint, the judged load:",
            "",
            endpoints,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=25, help="rounds of 4 calls per client")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each load per server")
    parser.add_argument(
        "--layouts",
        type=parse_layout,
        nargs="*",
        default=[(2, 8), (4, 2)],
        help="other `volplugin serve` layouts to load with curl, WORKERSxTHREADS",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vp-bench-") as tmp, private_dockerd() as daemon:
        plugin = PluginProcess(Path(tmp) / "root", env=daemon.env).start()
        try:
            daemon.docker("run", "--rm", BASE_IMAGE, "true")  # warm up
            totals = docker_rounds(daemon, ["local", plugin.name], args.rounds)
            totals["plugin"] = totals.pop(plugin.name)
            post(str(plugin.socket), "VolumeDriver.Create", {"Name": VOLUME})
            runs, kept = load_runs(plugin, Path(tmp), args, daemon.env)
        finally:
            remove_driver_objects(daemon.env, plugin.name)
            plugin.cleanup()

    text = report(args, totals, runs, kept, load)
    print(text)
    if not args.no_write:
        write_section("volplugin", text)


if __name__ == "__main__":
    main()

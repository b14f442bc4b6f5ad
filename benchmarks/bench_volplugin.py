"""Benchmark volplugin against Docker's built-in `local` volume driver.

Part 1, side by side in one run: ROUNDS rounds of `docker volume create`, `docker run
--rm -v VOL:/d busybox true`, `docker volume rm`, alternating the driver each round.
Part 2: the plugin's own request latency (p50, p99) under CLIENTS concurrent clients
posting Get / Mount / Unmount / List straight to its socket in a closed loop, from a
compiled client (curl, like the daemon's Go client) and from Python client processes
(benchmarks.plugin_load); beside it, in the same run, the floor: a minimal Flask app
served the same way (benchmarks.flask_floor).

Runs on a private dockerd (same binary as the shared one) so that the short-lived
driver is not left behind in the shared daemon. Writes its section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/bench_volplugin.py [--rounds 50] [--clients 20]
"""

from __future__ import annotations

import argparse
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

from benchmarks.common import (  # noqa: E402
    command_line,
    environment_summary,
    markdown_table,
    write_section,
)
from benchmarks.plugin_load import VOLUME, LoadResult, curl_load, python_load  # noqa: E402
from tests.support.dockerenv import BASE_IMAGE  # noqa: E402
from tests.support.plugin import PluginProcess, post, remove_driver_objects  # noqa: E402
from tests.support.private_dockerd import private_dockerd  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402
from volplugin.server import DEFAULT_THREADS  # noqa: E402
from volplugin.workers import default_workers  # noqa: E402


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
def flask_floor(sock: Path, workers: int) -> Iterator[int]:
    """Run benchmarks.flask_floor on `sock`; yield its PID."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.flask_floor", str(sock), "--workers", str(workers)],
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


def load_runs(plugin: PluginProcess, floor_sock: Path, clients: int, rounds: int) -> dict:
    """Each load on the plugin, and curl's on the floor server, one after the other."""
    assert plugin.proc is not None
    sock, pid = str(plugin.socket), plugin.proc.pid
    post(sock, "VolumeDriver.Create", {"Name": VOLUME})
    runs = {
        "single": python_load(sock, pid, 1, rounds * 4),
        "curl": curl_load(sock, pid, clients, rounds),
        "python": python_load(sock, pid, clients, rounds),
    }
    post(sock, "VolumeDriver.Remove", {"Name": VOLUME})
    with flask_floor(floor_sock, default_workers()) as floor_pid:
        runs["floor"] = curl_load(str(floor_sock), floor_pid, clients, rounds)
    return runs


def report(args: argparse.Namespace, totals: dict[str, float], runs: dict, load: float) -> str:
    local, ours = totals["local"], totals["plugin"]
    ratio = ours / local
    curl, target = runs["curl"], 20.0
    p99 = curl.p(0.99)

    def row(label: str, server: str, r: LoadResult) -> list[str]:
        return [
            label,
            server,
            f"{r.p(0.50):.1f}",
            f"**{r.p(0.99):.1f}**",
            f"{r.mean_ms:.1f}",
            f"{r.per_second:.0f}",
            f"{r.cpu_ms_per_request:.2f}",
        ]

    n = args.clients
    latency = markdown_table(
        ["load", "server", "p50 ms", "p99 ms", "mean ms", "requests/s", "server CPU ms/request"],
        [
            row(f"curl, {n} connections", "volplugin", curl),
            row(f"{n} Python processes", "volplugin", runs["python"]),
            row("1 Python process", "volplugin", runs["single"]),
            row(f"curl, {n} connections", "minimal Flask app (floor)", runs["floor"]),
        ],
    )
    endpoints = markdown_table(
        ["endpoint", "p50 ms", "p99 ms"],
        [
            [name, f"{curl.p(0.50, name):.1f}", f"{curl.p(0.99, name):.1f}"]
            for name in sorted(curl.by_endpoint)
        ],
    )
    workers = default_workers()
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
            f"{args.requests} times on one keep-alive connection ({n * args.requests * 4} "
            f"requests per load). Servers: `volplugin serve` defaults ({workers} process(es) "
            f"of {DEFAULT_THREADS} threads) and the same layout for the floor.",
            "",
            latency,
            "",
            f"Target p99 <= {target:.0f} ms under {n} concurrent clients, judged on the curl "
            f"load: **{p99:.1f} ms, {'met' if p99 <= target else 'NOT met'}**.",
            "",
            "volplugin by endpoint, curl load:",
            "",
            endpoints,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=25, help="rounds of 4 calls per client")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vp-bench-") as tmp, private_dockerd() as daemon:
        plugin = PluginProcess(Path(tmp) / "root", env=daemon.env).start()
        try:
            daemon.docker("run", "--rm", BASE_IMAGE, "true")  # warm up
            totals = docker_rounds(daemon, ["local", plugin.name], args.rounds)
            totals["plugin"] = totals.pop(plugin.name)
            runs = load_runs(plugin, Path(tmp) / "floor.sock", args.clients, args.requests)
        finally:
            remove_driver_objects(daemon.env, plugin.name)
            plugin.cleanup()

    text = report(args, totals, runs, load)
    print(text)
    if not args.no_write:
        write_section("volplugin", text)


if __name__ == "__main__":
    main()

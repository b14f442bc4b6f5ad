"""Benchmark volplugin against Docker's built-in `local` volume driver.

Part 1, side by side in one run: ROUNDS rounds of `docker volume create`, `docker run
--rm -v VOL:/d busybox true`, `docker volume rm`, alternating the driver each round.
Part 2: the plugin's own request latency (p50, p99) under CLIENTS concurrent clients
posting Get / Mount / Unmount / List straight to its socket.

Runs on a private dockerd (same binary as the shared one) so that the short-lived
driver is not left behind in the shared daemon. Writes its section of
benchmarks/RESULTS.md between `<!-- volplugin -->` markers.

    .venv/bin/python benchmarks/bench_volplugin.py [--rounds 50] [--clients 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.dockerenv import BASE_IMAGE  # noqa: E402
from tests.support.plugin import (  # noqa: E402
    PluginProcess,
    UnixHTTPConnection,
    post,
    remove_driver_objects,
    worker_pids,
)
from tests.support.private_dockerd import private_dockerd  # noqa: E402
from volplugin.workers import default_workers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- volplugin -->", "<!-- /volplugin -->"


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


def _client(args: tuple[str, int, int]) -> list[float]:
    """One client process: a keep-alive connection, like the daemon's plugin client."""
    sock, n, rounds = args
    conn = UnixHTTPConnection(sock)
    samples = []
    for j in range(rounds):
        for endpoint, body in (
            ("VolumeDriver.Get", {"Name": "vp-bench-lat"}),
            ("VolumeDriver.Mount", {"Name": "vp-bench-lat", "ID": f"{n}-{j}"}),
            ("VolumeDriver.Unmount", {"Name": "vp-bench-lat", "ID": f"{n}-{j}"}),
            ("VolumeDriver.List", {}),
        ):
            start = time.perf_counter()
            conn.request("POST", "/" + endpoint, body=json.dumps(body).encode())
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            samples.append(time.perf_counter() - start)
            if resp.status != 200 or doc.get("Err"):
                raise RuntimeError(f"{endpoint} failed: {doc}")
    conn.close()
    return samples


def latency(plugin: PluginProcess, clients: int, rounds: int) -> list[float]:
    """Request latencies seen by `clients` concurrent client processes."""
    sock = str(plugin.socket)
    post(sock, "VolumeDriver.Create", {"Name": "vp-bench-lat"})
    with multiprocessing.Pool(clients) as pool:
        results = pool.map(_client, [(sock, n, rounds) for n in range(clients)])
    post(sock, "VolumeDriver.Remove", {"Name": "vp-bench-lat"})
    return [x for r in results for x in r]


def server_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of the plugin's main process and its worker processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in (pid, *worker_pids(pid)):
        try:
            with open(f"/proc/{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def server_durations(plugin: PluginProcess) -> list[float]:
    """Time spent inside the app per request, from the plugin's access log (ms)."""
    marker = "volplugin.access: "
    return [
        json.loads(line.split(marker, 1)[1])["duration_ms"]
        for line in plugin.log().splitlines()
        if marker in line and "vp-bench-lat" in line
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_section(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        current = head + section + tail
    else:
        current = current.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=25, help="rounds of 4 calls per client")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vp-bench-") as tmp, private_dockerd() as daemon:
        plugin = PluginProcess(Path(tmp) / "root", env=daemon.env).start()
        try:
            daemon.docker("run", "--rm", BASE_IMAGE, "true")  # warm up
            totals = docker_rounds(daemon, ["local", plugin.name], args.rounds)
            load_before = os.getloadavg()
            single = latency(plugin, 1, args.requests * 4)
            assert plugin.proc is not None
            cpu_before = server_cpu_seconds(plugin.proc.pid)
            samples = latency(plugin, args.clients, args.requests)
            cpu_ms = (server_cpu_seconds(plugin.proc.pid) - cpu_before) / len(samples) * 1000
            inside = server_durations(plugin)
        finally:
            remove_driver_objects(daemon.env, plugin.name)
            plugin.cleanup()

    local, ours = totals["local"], totals[plugin.name]
    ratio = ours / local
    p50, p99 = percentile(samples, 0.50) * 1000, percentile(samples, 0.99) * 1000
    load = " ".join(f"{x:.1f}" for x in load_before)
    s50, s99 = percentile(single, 0.50) * 1000, percentile(single, 0.99) * 1000
    i50, i99 = percentile(inside, 0.50), percentile(inside, 0.99)
    lines = [
        "## volplugin (Docker volume plugin)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_volplugin.py --rounds {args.rounds} "
        f"--clients {args.clients} --requests {args.requests}`",
        f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load} (1/5/15 min) before the latency part; a private dockerd "
        + subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout.strip()
        + ".",
        "",
        f"{args.rounds} rounds of volume create + `docker run --rm -v VOL:/d busybox true` + "
        "volume rm, drivers alternating:",
        "",
        "| driver | total (s) | per round (ms) |",
        "|---|---|---|",
        f"| local | {local:.2f} | {local / args.rounds * 1000:.0f} |",
        f"| volplugin | {ours:.2f} | {ours / args.rounds * 1000:.0f} |",
        "",
        f"Ratio volplugin/local: **{ratio:.2f}x** (target <= 1.2x: "
        f"{'met' if ratio <= 1.2 else 'NOT met'}).",
        "",
        f"Plugin request latency, {args.clients} concurrent client processes, "
        f"{len(samples)} requests (Get, Mount, Unmount, List in a closed loop, keep-alive "
        "connections):",
        f"p50 **{p50:.2f} ms**, p99 **{p99:.2f} ms**, mean "
        f"{statistics.mean(samples) * 1000:.2f} ms (target p99 <= 20 ms: "
        f"{'met' if p99 <= 20 else 'NOT met'}).",
        f"One client alone: p50 {s50:.2f} ms, p99 {s99:.2f} ms. Time inside the app (access "
        f"log, all requests of both runs): p50 {i50:.2f} ms, p99 {i99:.2f} ms. Server CPU "
        f"time per request under the {args.clients} clients: {cpu_ms:.2f} ms. Server: "
        f"`volplugin serve` defaults, {default_workers()} process(es) of 8 threads.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()

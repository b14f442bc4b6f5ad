"""Closed-loop request load on a plugin socket, and what the server spent answering it.

Two load generators post the same calls (per client: Get, Mount, Unmount, List, again
and again, on one keep-alive connection each):

- `curl_load`: one curl process per client, sending its calls in order on one
  kept-alive connection. A compiled client, like the Docker daemon's plugin client,
  so that the load generator takes little of the CPU it measures.
- `python_load`: CLIENTS Python processes using http.client. Each costs about as much
  CPU per request as the server, so on a small machine it measures the two together.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import BenchError, process_tree, require_tools
from tests.support.plugin import UnixHTTPConnection

VOLUME = "vp-bench-lat"
Call = tuple[str, dict]


def client_calls(client: int, rounds: int) -> list[Call]:
    """The calls of one client: `rounds` rounds of Get, Mount, Unmount, List."""
    calls: list[Call] = []
    for j in range(rounds):
        mount = {"Name": VOLUME, "ID": f"{client}-{j}"}
        calls += [
            ("VolumeDriver.Get", {"Name": VOLUME}),
            ("VolumeDriver.Mount", mount),
            ("VolumeDriver.Unmount", mount),
            ("VolumeDriver.List", {}),
        ]
    return calls


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LoadResult:
    """Latencies (seconds) by endpoint, the run's wall time, the server's CPU seconds."""

    by_endpoint: dict[str, list[float]] = field(default_factory=dict)
    wall: float = 0.0
    server_cpu: float = 0.0

    @property
    def samples(self) -> list[float]:
        return [x for values in self.by_endpoint.values() for x in values]

    def p(self, q: float, endpoint: str | None = None) -> float:
        values = self.by_endpoint[endpoint] if endpoint else self.samples
        return percentile(values, q) * 1000

    @property
    def mean_ms(self) -> float:
        return statistics.mean(self.samples) * 1000

    @property
    def per_second(self) -> float:
        return len(self.samples) / self.wall

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu / len(self.samples) * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants (live ones)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for proc in process_tree(pid):
        try:
            with open(f"/proc/{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _curl_config(sock: str, calls: list[Call]) -> str:
    """A curl config file running `calls` one after another, on one kept-alive connection."""
    return "next\n".join(
        f'url = "http://localhost/{endpoint}"\n'
        f'unix-socket = "{sock}"\n'
        f"data = {json.dumps(json.dumps(body))}\n"
        'write-out = "%{http_code} %{time_total} %{url_effective}\\n"\n'
        'output = "/dev/null"\n'
        for endpoint, body in calls
    )


def curl_load(sock: str, server_pid: int, clients: int, rounds: int) -> LoadResult:
    """Each client's calls, in order, through its own curl process; all clients at once.

    A client's Mount must be answered before its Unmount is sent, as with the daemon,
    so each client is one curl running its calls one after another (`curl --parallel`
    would send a client's Mount and Unmount together, in either order).
    """
    require_tools("curl")
    with tempfile.TemporaryDirectory(prefix="vp-load-") as tmp:
        configs = []
        for n in range(clients):
            config = Path(tmp) / f"client-{n}.curl"
            config.write_text(_curl_config(sock, client_calls(n, rounds)))
            configs.append(config)
        cpu_before, start = cpu_seconds(server_pid), time.perf_counter()
        procs = [
            subprocess.Popen(
                ["curl", "-sS", "-K", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for config in configs
        ]
        outs = [(proc.communicate(), proc.returncode) for proc in procs]
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(server_pid) - cpu_before
    result = LoadResult(wall=wall, server_cpu=server_cpu)
    for (stdout, stderr), returncode in outs:
        if returncode != 0:
            raise BenchError(f"curl failed ({returncode}): {stderr.strip()}")
        for line in stdout.splitlines():
            code, seconds, url = line.split()
            if code != "200":
                raise BenchError(f"{url} answered HTTP {code}")
            result.by_endpoint.setdefault(url.rsplit("/", 1)[1], []).append(float(seconds))
    expected = clients * len(client_calls(0, rounds))
    if len(result.samples) != expected:
        raise BenchError(f"curl reported {len(result.samples)} answers for {expected} calls")
    return result


def _python_client(args: tuple[str, int, int]) -> dict[str, list[float]]:
    sock, client, rounds = args
    conn = UnixHTTPConnection(sock)
    seen: dict[str, list[float]] = {}
    for endpoint, body in client_calls(client, rounds):
        start = time.perf_counter()
        conn.request("POST", "/" + endpoint, body=json.dumps(body).encode())
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        seen.setdefault(endpoint, []).append(time.perf_counter() - start)
        if resp.status != 200 or doc.get("Err"):
            raise BenchError(f"{endpoint} failed: {doc}")
    conn.close()
    return seen


def python_load(sock: str, server_pid: int, clients: int, rounds: int) -> LoadResult:
    """The same calls from `clients` Python processes, one connection each."""
    with multiprocessing.Pool(clients) as pool:
        cpu_before, start = cpu_seconds(server_pid), time.perf_counter()
        parts = pool.map(_python_client, [(sock, n, rounds) for n in range(clients)])
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(server_pid) - cpu_before
    result = LoadResult(wall=wall, server_cpu=server_cpu)
    for part in parts:
        for endpoint, values in part.items():
            result.by_endpoint.setdefault(endpoint, []).extend(values)
    return result

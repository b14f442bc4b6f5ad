"""Closed-loop request load on a plugin socket, and what the server spent answering it.

Three load generators post the same calls (per client: Get, Mount, Unmount, List, again
and again, in order, on one keep-alive connection each). A client's next call waits
for the answer to its last, as the daemon's Unmount of a container waits for its Mount.

- `asyncio_load`: one process holding all the clients' connections, like the Docker
  daemon's plugin client (one process, a pool of connections). It speaks just enough
  HTTP/1.1 for the plugin's answers and costs the least CPU per request of the three,
  so it leaves the most of a small machine's cores to the server it measures.
- `curl_load`: one curl process per client: a compiled client, but twenty processes
  (`curl --parallel` would send a client's calls at once, in any order).
- `python_load`: CLIENTS Python processes using http.client. Each costs about as much
  CPU per request as the server, so on a small machine it measures the two together.

Each result carries the server's CPU time and the load generator's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
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
    """Latencies (seconds) by endpoint, the run's wall time, server and client CPU seconds."""

    by_endpoint: dict[str, list[float]] = field(default_factory=dict)
    wall: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

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

    @property
    def client_cpu_ms_per_request(self) -> float:
        return self.client_cpu / len(self.samples) * 1000

    def add(self, endpoint: str, seconds: float) -> None:
        self.by_endpoint.setdefault(endpoint, []).append(seconds)


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


def children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _request(endpoint: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST /{endpoint} HTTP/1.1\r\nHost: plugin\r\n"
        "Content-Type: application/vnd.docker.plugins.v1.2+json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _answer(reader: asyncio.StreamReader, endpoint: str) -> None:
    """Read one answer; raise unless it is HTTP 200 with a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, *headers = head.decode("latin-1").split("\r\n")
    if status.split(" ", 2)[1:2] != ["200"]:
        raise BenchError(f"{endpoint} answered {status!r}")
    for header in headers:
        name, _, value = header.partition(":")
        if name.lower() == "content-length":
            await reader.readexactly(int(value))
            return
    raise BenchError(f"{endpoint} answered without a Content-Length")


async def _asyncio_client(sock: str, calls: list[Call], result: LoadResult) -> None:
    reader, writer = await asyncio.open_unix_connection(sock)
    try:
        for endpoint, body in calls:
            request = _request(endpoint, body)
            start = time.perf_counter()
            writer.write(request)
            await _answer(reader, endpoint)
            result.add(endpoint, time.perf_counter() - start)
    finally:
        writer.close()


def asyncio_load(sock: str, server_pid: int, clients: int, rounds: int) -> LoadResult:
    """All clients' calls from this process, one connection and one coroutine each."""

    async def run() -> LoadResult:
        result = LoadResult()
        await asyncio.gather(
            *(_asyncio_client(sock, client_calls(n, rounds), result) for n in range(clients))
        )
        return result

    cpu_before, mine_before, start = (
        cpu_seconds(server_pid),
        time.process_time(),
        time.perf_counter(),
    )
    result = asyncio.run(run())
    result.wall = time.perf_counter() - start
    result.server_cpu = cpu_seconds(server_pid) - cpu_before
    result.client_cpu = time.process_time() - mine_before
    return result


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
        cpu_before, clients_before = cpu_seconds(server_pid), children_cpu()
        start = time.perf_counter()
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
    result = LoadResult(
        wall=wall, server_cpu=server_cpu, client_cpu=children_cpu() - clients_before
    )
    for (stdout, stderr), returncode in outs:
        if returncode != 0:
            raise BenchError(f"curl failed ({returncode}): {stderr.strip()}")
        for line in stdout.splitlines():
            code, seconds, url = line.split()
            if code != "200":
                raise BenchError(f"{url} answered HTTP {code}")
            result.add(url.rsplit("/", 1)[1], float(seconds))
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
    clients_before = children_cpu()
    with multiprocessing.Pool(clients) as pool:
        cpu_before, start = cpu_seconds(server_pid), time.perf_counter()
        parts = pool.map(_python_client, [(sock, n, rounds) for n in range(clients)])
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(server_pid) - cpu_before
    # the pool's processes were started before the clock and are reaped after it
    result = LoadResult(
        wall=wall, server_cpu=server_cpu, client_cpu=children_cpu() - clients_before
    )
    for part in parts:
        for endpoint, values in part.items():
            result.by_endpoint.setdefault(endpoint, []).extend(values)
    return result

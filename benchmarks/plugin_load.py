"""A closed-loop request load straight on a plugin socket, and the server's CPU for it.

`asyncio_load`: CLIENTS clients in one process (one keep-alive connection and one
coroutine each, speaking just the HTTP/1.1 the plugin answers), each posting Get, Mount,
Unmount, List ROUNDS times in order, a call only once the last one is answered, as the
daemon's Unmount of a container waits for its Mount. One process holding a pool of
connections is how the Docker daemon's plugin client talks to a plugin.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.common import BenchError, process_tree

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
    """The `q` quantile (0..1) of `values`, nearest rank."""
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
        """The `q` quantile in milliseconds, of one endpoint or of all."""
        values = self.by_endpoint[endpoint] if endpoint else self.samples
        return percentile(values, q) * 1000

    @property
    def per_second(self) -> float:
        return len(self.samples) / self.wall

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu / len(self.samples) * 1000

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

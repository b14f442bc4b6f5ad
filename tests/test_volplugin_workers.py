"""`volplugin serve --workers N`: several processes on one socket, one set of volumes.

Through the real server: requests are answered by more than one process and mount
counts stay exact across them; a SIGKILLed main process takes its workers along (no
process is left answering on the socket); a dead worker is replaced. The cross-process
lock is checked against a second real process; the lazy fill of a volume created in a
worker process is started by the main process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.plugin import PluginProcess, UnixHTTPConnection, without_docker, worker_pids
from tests.support.waiting import wait_for
from volplugin.oplock import OpLock

WORKERS = 3


def _alive(pid: int) -> bool:
    """Whether any thread of `pid` still runs (a zombie leader may wait for its threads)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except FileNotFoundError:
            continue
    return False


def _refused(path: Path) -> bool:
    try:
        UnixHTTPConnection(str(path), timeout=2).connect()
    except OSError:
        return True
    return False


@pytest.fixture
def plugin(tmp_path: Path):
    env = without_docker(tmp_path)
    p = PluginProcess(tmp_path / "root", env=env, args=("--workers", str(WORKERS))).start()
    try:
        assert p.proc is not None
        assert len(worker_pids(p.proc.pid)) == WORKERS - 1  # start() waited for them all
        yield p
    finally:
        p.cleanup()


def ok(plugin: PluginProcess, endpoint: str, body: dict | None = None) -> dict:
    status, doc = plugin.call(endpoint, body)
    assert status == 200 and not doc.get("Err"), doc
    return doc


def test_workers_answer_and_share_exact_mount_counts(plugin: PluginProcess) -> None:
    ok(plugin, "VolumeDriver.Create", {"Name": "shared"})
    errors: list[str] = []

    def client(i: int) -> None:
        conn = UnixHTTPConnection(str(plugin.socket))
        try:
            for j in range(15):
                for endpoint, mid in (("Mount", f"{i}-{j}"), ("Mount", f"{i}-{j}")):
                    body = json.dumps({"Name": "shared", "ID": mid}).encode()
                    conn.request("POST", f"/VolumeDriver.{endpoint}", body=body)
                    resp = conn.getresponse()
                    doc = json.loads(resp.read())
                    if resp.status != 200 or doc.get("Err"):
                        errors.append(str(doc))
                body = json.dumps({"Name": "shared", "ID": f"{i}-{j}"}).encode()
                conn.request("POST", "/VolumeDriver.Unmount", body=body)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors.append(f"unmount {resp.status}")
        finally:
            conn.close()

    # New connections while others are busy land on different processes.
    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    status = ok(plugin, "VolumeDriver.Get", {"Name": "shared"})["Volume"]["Status"]
    assert status["Containers"] == 0
    served = {doc["pid"] for doc in plugin.access_records("/VolumeDriver.Mount", 20 * 15 * 2)}
    assert plugin.proc is not None
    assert len(served) >= 2 and served <= {plugin.proc.pid, *worker_pids(plugin.proc.pid)}


def test_keep_alive_connections_spread_evenly_over_the_processes(
    plugin: PluginProcess,
) -> None:
    """Connections opened one after another land one per process in turn (LoadBoard).

    Without the board the kernel gives them to whichever process wakes first; measured,
    that put most connections on one process.
    """
    conns = []
    try:
        for _ in range(4 * WORKERS):
            conn = UnixHTTPConnection(str(plugin.socket))
            conn.request("POST", "/VolumeDriver.Capabilities", body=b"")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            conns.append(conn)  # kept open, as a keep-alive client does
        served = [
            doc["pid"] for doc in plugin.access_records("/VolumeDriver.Capabilities", 4 * WORKERS)
        ]
    finally:
        for conn in conns:
            conn.close()
    counts = sorted(served.count(pid) for pid in set(served))
    assert len(counts) == WORKERS and counts[-1] - counts[0] <= 1, counts


def test_sigkill_of_the_main_process_takes_the_workers_along(plugin: PluginProcess) -> None:
    ok(plugin, "VolumeDriver.Create", {"Name": "kept"})
    ok(plugin, "VolumeDriver.Mount", {"Name": "kept", "ID": "c1"})
    assert plugin.proc is not None
    workers = worker_pids(plugin.proc.pid)
    plugin.kill()
    wait_for(lambda: not any(_alive(w) for w in workers), "the workers to die", 10)
    # nobody answers on the socket left behind
    wait_for(lambda: _refused(plugin.socket), "the socket to be refused", 10)
    plugin.start()
    doc = ok(plugin, "VolumeDriver.Get", {"Name": "kept"})
    assert doc["Volume"]["Status"]["Containers"] == 1


def test_a_dead_worker_is_replaced(plugin: PluginProcess) -> None:
    assert plugin.proc is not None
    main = plugin.proc.pid
    victim = worker_pids(main)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(worker_pids(main)) == WORKERS - 1 and victim not in worker_pids(main),
        "a new worker process",
        30,
    )
    ok(plugin, "VolumeDriver.Create", {"Name": "after"})
    assert f"worker process {victim} exited" in plugin.log()


def test_sigterm_stops_the_workers_too(plugin: PluginProcess) -> None:
    assert plugin.proc is not None
    workers = worker_pids(plugin.proc.pid)
    assert plugin.stop() == 0
    assert not any(_alive(w) for w in workers)
    assert not plugin.socket.exists()


def test_oplock_excludes_another_process(tmp_path: Path) -> None:
    path = tmp_path / "ops.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from volplugin.oplock import OpLock; "
            f"lock = OpLock({str(path)!r}); lock.acquire(); print('held', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = OpLock(path)
        start = time.monotonic()
        assert lock.acquire(timeout=0.3) is False
        assert time.monotonic() - start >= 0.3
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits, and its lock goes with it
        holder.wait(10)
        assert lock.acquire(timeout=5) is True
        # Inside one process the lock excludes other threads too.
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.1)))
        t.start()
        t.join()
        assert got == [False]
        lock.release()
        assert lock.acquire(timeout=1) is True
        lock.release()
        lock.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def _thread_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of `pid`."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def _two_cpus() -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs to give each serving process one of its own")
    return allowed


def test_each_serving_process_keeps_to_a_cpu_of_its_own_by_default(
    tmp_path: Path, plugin: PluginProcess
) -> None:
    allowed = _two_cpus()
    assert plugin.proc is not None
    if len(allowed) < WORKERS:  # the fixture's processes outnumber the CPUs: none pinned
        assert _thread_cpus(plugin.proc.pid) == {frozenset(allowed)}
    pinned = PluginProcess(tmp_path / "pinned", env=plugin.env, args=("--workers", "2")).start()
    free = PluginProcess(
        tmp_path / "free", env=plugin.env, args=("--workers", "2", "--cpu-affinity", "off")
    )
    try:
        assert pinned.proc is not None
        (worker,) = worker_pids(pinned.proc.pid)
        # every thread, the request threads included, runs on its process's CPU
        assert _thread_cpus(pinned.proc.pid) == {frozenset({allowed[0]})}
        assert _thread_cpus(worker) == {frozenset({allowed[1]})}
        assert pinned.call("VolumeDriver.Create", {"Name": "v"})[0] == 200
        pinned.cleanup()
        free.start()
        assert free.proc is not None
        (worker,) = worker_pids(free.proc.pid)
        assert _thread_cpus(free.proc.pid) == _thread_cpus(worker) == {frozenset(allowed)}
    finally:
        pinned.cleanup()
        free.cleanup()


def _hog(cpu: int) -> subprocess.Popen:
    """A process that keeps `cpu` busy."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def test_a_busy_serving_process_lets_go_of_a_crowded_cpu_and_comes_back(
    tmp_path: Path, plugin: PluginProcess
) -> None:
    allowed = _two_cpus()
    env = {**(plugin.env or {}), "VOLPLUGIN_CPU_CHECK": "0.3"}  # unpinned for 15 checks
    server = PluginProcess(tmp_path / "crowded", env=env, args=("--workers", "2")).start()
    hogs: list[subprocess.Popen] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            server.call("VolumeDriver.List")

    try:
        assert server.proc is not None
        main, (worker,) = server.proc.pid, worker_pids(server.proc.pid)
        # (Other start-ups, the fixture's for one, may have crowded its CPU already.)
        wait_for(
            lambda: _thread_cpus(main) == {frozenset({allowed[0]})},
            "the main process to keep to its CPU",
            timeout=30,
        )
        hogs = [_hog(allowed[0]), _hog(allowed[0])]
        time.sleep(1.5)  # five checks: an idle process stays where it is
        assert _thread_cpus(main) == {frozenset({allowed[0]})}
        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        wait_for(
            lambda: _thread_cpus(main) == {frozenset(allowed)},
            "the main process to let go of its crowded CPU",
            timeout=30,
        )
        assert _thread_cpus(worker) == {frozenset({allowed[1]})}  # its CPU has room
        assert f"CPU {allowed[0]} is busy with other work" in server.log()
        for hog in hogs:
            hog.kill()
            hog.wait()
        stop.set()
        for client in clients:
            client.join()
        wait_for(
            lambda: _thread_cpus(main) == {frozenset({allowed[0]})},
            "the main process to keep to its CPU again",
            timeout=30,
        )
        assert server.call("VolumeDriver.List")[0] == 200
    finally:
        stop.set()
        for hog in hogs:
            hog.kill()
            hog.wait()
        server.cleanup()

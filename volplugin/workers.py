"""Extra request-serving processes of `volplugin serve`, sharing its listening socket.

One Python process answers requests with one core at most (the GIL), so the server
starts WORKERS - 1 more processes (`volplugin serve-worker`), each serving the same
Flask app with waitress threads on the socket it inherits. They share the volumes
through the state database and volplugin.oplock; background work (reconciliation,
scheduled backups, lazy fills) stays in the main process.

A worker asks the kernel to kill it when the main process dies (PR_SET_PDEATHSIG), so
a SIGKILLed server leaves no process answering on its socket. The pool restarts a
worker that exits while the server runs, after RESPAWN_DELAY if it died young.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from volplugin.affinity import CHECK_SECONDS
from volplugin.balance import LoadBoard
from volplugin.defaults import default_workers  # noqa: F401 (re-exported)

log = logging.getLogger("volplugin.workers")

PR_SET_PDEATHSIG = 1
RESPAWN_DELAY = 5.0  # seconds to wait before restarting a worker that died young
YOUNG = 10.0  # a worker that exits sooner than this after its start died young
STOP_GRACE = 10.0  # seconds a stopping worker gets before SIGKILL


def die_with_parent(parent: int) -> None:
    """In a worker: be killed when `parent` (the main server process) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent:  # it died before the request above
        os._exit(1)


@dataclass
class _Worker:
    proc: subprocess.Popen
    started: float
    slot: int  # its place on the LoadBoard (the main process has 0)


@dataclass
class WorkerPool:
    """`count` worker processes running `command` with `sock` as file descriptor 3+."""

    command: list[str]
    sock: socket.socket
    count: int
    board: LoadBoard
    cpus: set[int] | None = None  # where workers start (they keep to one of them later)
    _workers: list[_Worker] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def argv(self, slot: int) -> list[str]:
        fd, parent = str(self.sock.fileno()), str(os.getpid())
        return [*self.command, "--fd", fd, "--parent", parent, "--slot", str(slot)]

    def start(self) -> WorkerPool:
        """Spawn the workers from a supervising thread that lives as long as the pool.

        (PR_SET_PDEATHSIG fires when the thread that spawned a child ends, so spawning
        and respawning happen on that one thread.)
        """
        if self.count <= 0:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, args=(ready,), name="volplugin-workers", daemon=True
        )
        self._thread.start()
        ready.wait()
        return self

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _spawn(self, slot: int) -> _Worker:
        proc = subprocess.Popen(
            self.argv(slot), pass_fds=[self.sock.fileno()], stdin=subprocess.DEVNULL
        )
        if self.cpus:
            # It starts up on any of them, not on this process's own CPU, where its
            # start-up would count as other work (volplugin.affinity); then it keeps
            # to a CPU of its own.
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(proc.pid, self.cpus)
        return _Worker(proc, time.monotonic(), slot)

    def _supervise(self, ready: threading.Event) -> None:
        try:
            self._workers = [self._spawn(slot) for slot in range(1, self.count + 1)]
        finally:
            ready.set()
        while not self._stop.wait(0.5):
            for i, worker in enumerate(self._workers):
                rc = worker.proc.poll()
                if rc is None:
                    continue
                self.board.clear(worker.slot)  # its connections are gone with it
                young = time.monotonic() - worker.started < YOUNG
                log.error(
                    "worker process %d exited with status %d; starting another%s",
                    worker.proc.pid,
                    rc,
                    f" in {RESPAWN_DELAY:.0f} s" if young else "",
                )
                if young and self._stop.wait(RESPAWN_DELAY):
                    break
                self._workers[i] = self._spawn(worker.slot)
        self._terminate()

    def _terminate(self) -> None:
        for worker in self._workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for worker in self._workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker process %d did not stop; killing it", worker.proc.pid)
                worker.proc.kill()
                worker.proc.wait()

    def stop(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL after STOP_GRACE) and wait for them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def worker_command(
    name: str,
    root: Path,
    threads: int,
    store: str | None,
    verbose: bool,
    cpus: list[int] | None = None,
    cpu_check: float = CHECK_SECONDS,
) -> list[str]:
    """The `volplugin serve-worker` command line for this server (without --fd/--parent).

    With `cpus`, each worker keeps to one of them, looking every `cpu_check` seconds
    (volplugin.affinity).
    """
    cmd = [sys.executable, "-m", "volplugin.cli", "--root", str(root), "--name", name]
    if verbose:
        cmd.append("--verbose")
    cmd += ["serve-worker", "--threads", str(threads)]
    if store:
        cmd += ["--store", store]
    if cpus:
        cmd += ["--cpus", ",".join(map(str, cpus)), "--cpu-check", str(cpu_check)]
    return cmd

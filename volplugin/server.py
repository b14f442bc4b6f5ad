"""`volplugin serve`: the plugin app on a unix socket, served by waitress threads.

The socket is /run/docker/plugins/NAME.sock with mode 0600 (root only). One server runs
per root (volplugin.rootlock); a stale socket of a killed server is replaced.
One process serves requests (waitress threads) and runs the background work: the
backup schedule, lazy fills, reconciliation with the daemon, and the jobs (backups,
restores, prunes) in a small pool (volplugin/jobs). At start, jobs a dead server left
are marked interrupted and the containers they had stopped or paused are put back before
any job runs; SIGTERM or SIGINT cancels the running jobs and waits (STOP_GRACE) for them
to put their containers back.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import waitress
from flask import Flask
from waitress.server import BaseWSGIServer

from layerfs.store.location import default_store_url
from volplugin.backup import seed, status
from volplugin.backup.scheduler import Scheduler
from volplugin.defaults import (
    DEFAULT_NAME,
    DEFAULT_ROOT,
    DEFAULT_THREADS,
    DEFAULT_TICK,
    PLUGIN_DIR,
    plugin_socket,
)
from volplugin.errors import StateError
from volplugin.jobs import status as job_status
from volplugin.jobs.journal import put_back
from volplugin.jobs.runner import STOP_GRACE, JobRunner
from volplugin.lazy.volumes import LazyVolumes
from volplugin.metrics.server import Metrics, parse_address
from volplugin.pluginrecord import write_record
from volplugin.protocol.app import create_app
from volplugin.roaming.volumes import RoamingVolumes
from volplugin.rootlock import serving_root
from volplugin.sidekick.paths import SIDEKICK_DIR, check_directory
from volplugin.sidekick.sockets import SidekickSockets
from volplugin.volumes.containers import docker_client
from volplugin.volumes.reconcile import reconcile_in_background, try_reconcile
from volplugin.volumes.service import VolumeService

SCHEDULER_GRACE = 5.0  # seconds a stopping server waits for its scheduler (it only starts jobs)
RECOVERY_RETRY = 5.0  # seconds between tries to put back containers while dockerd is away
STALE_GRACE = 2.0  # seconds a socket may go on answering before it counts as live

log = logging.getLogger("volplugin.server")


def _answers(path: Path, grace: float) -> bool:
    """Whether something still accepts connections on `path` after `grace` seconds.

    A killed server's processes close their sockets a moment after they are gone from
    view (threads of a dying process still hold its descriptors), so a connection that
    succeeds is retried until `grace` has passed.
    """
    deadline = time.monotonic() + grace
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        finally:
            probe.close()
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)


def bind_socket(path: Path) -> socket.socket:
    """Bind a listening unix socket at `path`, mode 0600, replacing a stale one."""
    from layerfs.unixsock import MAX_PATH_BYTES, bind_private

    if len(os.fsencode(path)) > MAX_PATH_BYTES:  # before anything is made or removed
        raise StateError(f"socket path {path} is too long for a unix socket: use a shorter name")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if _answers(path, STALE_GRACE):
            raise StateError(f"a server already listens on {path}: stop it or pick another --name")
        path.unlink()
    return bind_private(path)


def serve(
    name: str = DEFAULT_NAME,
    root: Path = DEFAULT_ROOT,
    *,
    plugin_dir: Path = PLUGIN_DIR,
    threads: int = DEFAULT_THREADS,
    store: str | None = None,
    schedule_tick: float = DEFAULT_TICK,
    sidekick_dir: Path = SIDEKICK_DIR,
    metrics_address: str | None = None,
    metrics_allow_remote: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT; remove the socket on the way out.

    `store` is the backup store URL (None: the layerfs default); scheduled backups are
    looked for every `schedule_tick` seconds. One process answers requests with
    `threads` waitress threads and runs the background work. Volumes with
    `sidekick-socket` get scoped sockets in `sidekick_dir`; `metrics_address` serves
    Prometheus metrics.
    """
    root = Path(root).absolute()
    path = plugin_socket(name, plugin_dir)
    metrics_at = parse_address(metrics_address, metrics_allow_remote) if metrics_address else None
    check_directory(sidekick_dir)
    check_repository(store)
    with serving_root(root):
        stop = threading.Event()
        service = status.attach(VolumeService.open(root, name))
        seed.attach(service, store)
        write_record(root, name, store or default_store_url())  # for the CLI (pluginrecord)
        service.empty_trash()
        seed.resume_interrupted(service, store)  # before serving: never half restored
        jobs = JobRunner.open(root)  # marks the jobs of a dead server interrupted
        job_status.attach(service, jobs.table)
        if not try_reconcile(service):
            reconcile_in_background(service, stop)
        lazy = LazyVolumes.attach(service, store, background=True)
        roaming = RoamingVolumes.attach(service, store, jobs, lazy)
        app = create_app(service)
        app.config["LAYERFS_STORE"] = store
        app.config["VOLPLUGIN_JOBS"] = jobs
        app.config["VOLPLUGIN_ROAMING"] = roaming  # None: the store cannot hold them
        metrics = Metrics.serve(service, app, metrics_at) if metrics_at else None
        sock = bind_socket(path)
        sidekicks = SidekickSockets.attach(service, app, store, sidekick_dir)
        scheduler = Scheduler(service, store, tick=schedule_tick, jobs=jobs).start(stop)
        try:
            server = waitress_server(app, sock, threads)
            _exit_on_signals(jobs)
            # Starting a container mounts its volumes through us: so once we serve.
            put_back_then_run(jobs, stop)
            log.info("serving driver %s on %s, root %s, %d thread(s)", name, path, root, threads)
            try:
                with contextlib.suppress(SystemExit):
                    server.run()
            finally:
                stop.set()
                server.close()
                scheduler.join(SCHEDULER_GRACE)
                jobs.shutdown(STOP_GRACE)  # done already, unless the loop ended otherwise
        finally:
            sidekicks.close()
            if metrics:
                metrics.close()
            if roaming:
                roaming.close()
            lazy.close()
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            jobs.close()
            service.state.close()
            log.info("stopped")


def put_back_then_run(jobs: JobRunner, stop: threading.Event) -> threading.Thread:
    """In a thread: put back the containers a dead server's jobs left stopped or paused,
    then start the job pool. While the daemon cannot be reached the pool starts anyway and
    the containers are tried again every RECOVERY_RETRY seconds."""

    def run() -> None:
        while not put_back(jobs.journal, lambda: docker_client(timeout=60)):
            jobs.start()
            if stop.wait(RECOVERY_RETRY):
                return
        jobs.start()

    thread = threading.Thread(target=run, name="volplugin-put-back", daemon=True)
    thread.start()
    return thread


def check_repository(store: str | None) -> None:
    """Fail at start, in one line, if the store's repository cannot be opened as configured.

    A wrong or missing password, or a store of an earlier format, stops serve
    now rather than at the first backup; a store that cannot be reached (an S3
    outage) is only logged: backups wait for it, volumes need no store.
    """
    from layerfs.errors import StoreError
    from layerfs.repo.repository import RepositoryError
    from layerfs.store.location import open_backend

    try:
        open_backend(store).close()  # password errors are not StoreErrors: they propagate
    except RepositoryError:
        raise
    except StoreError as exc:
        log.warning("the backup store cannot be opened now (backups wait for it): %s", exc)


def waitress_server(app: Flask, sock: socket.socket, threads: int) -> BaseWSGIServer:
    """waitress serving `app` on the listening socket `sock` with `threads` threads."""
    # Under load waitress warns of its queue depth on every request: noise.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return waitress.create_server(
        app,
        sockets=[sock],
        threads=threads,
        ident="volplugin",
        max_request_body_size=1024 * 1024,
        backlog=1024,
    )


def _exit_on_signals(jobs: JobRunner) -> None:
    """SIGTERM and SIGINT: cancel the jobs, wait for them (STOP_GRACE) in a thread, then
    leave the server loop.

    Requests are served meanwhile: a cancelled backup starts the containers it stopped,
    and the daemon mounts their volumes through us. More signals meanwhile are ignored.
    """
    stopped = threading.Event()
    stopping: list[str] = []

    def wind_down() -> None:
        log.info("%s: stopping", stopping[0])
        try:
            jobs.shutdown(STOP_GRACE)
        finally:
            stopped.set()
            _thread.interrupt_main(signal.SIGINT)  # runs `handler` in the main thread

    def handler(signum: int, frame: object) -> None:
        if stopped.is_set():
            sys.exit(0)  # leaves waitress' loop
        if stopping:
            return
        stopping.append(signal.Signals(signum).name)
        jobs.request_stop(stopping[0])
        threading.Thread(target=wind_down, name="volplugin-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

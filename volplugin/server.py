"""`volplugin serve`: the plugin app on a unix socket, served by waitress threads.

The socket is /run/docker/plugins/NAME.sock with mode 0600 (root only). One server runs
per root (an flock on ROOT/serve.lock); a stale socket of a killed server is replaced.
The main process serves requests and runs the background work; WORKERS - 1 more
processes (volplugin.workers, `serve_worker` here) serve requests on the same socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import waitress
from flask import Flask
from waitress.server import BaseWSGIServer

from layerfs.store.location import default_store_url
from volplugin.accesslog import batched_access_log
from volplugin.affinity import CHECK_SECONDS, CpuPin, allowed_cpus
from volplugin.app import create_app
from volplugin.backup import seed
from volplugin.balance import LoadBoard, balance
from volplugin.channel import QuietChannel
from volplugin.defaults import (
    DEFAULT_NAME,
    DEFAULT_ROOT,
    DEFAULT_THREADS,
    DEFAULT_TICK,
    PLUGIN_DIR,
)
from volplugin.errors import StateError
from volplugin.lazy import LazyVolumes
from volplugin.names import check_name
from volplugin.pluginrecord import write_record
from volplugin.reconcile import reconcile_in_background, try_reconcile
from volplugin.scheduler import Scheduler
from volplugin.state import checkpoint_in_background
from volplugin.volumes import VolumeService
from volplugin.workers import WorkerPool, die_with_parent, worker_command

SCHEDULER_GRACE = 120.0  # seconds a stopping server waits for a scheduled backup
BOARD_NAME = "serve.board"  # the serving processes' connection counts (volplugin.balance)
STALE_GRACE = 2.0  # seconds a socket may go on answering before it counts as live

log = logging.getLogger("volplugin.server")


def socket_path(name: str, plugin_dir: Path = PLUGIN_DIR) -> Path:
    return Path(plugin_dir) / f"{check_name(name)}.sock"


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the root for the life of the server."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"another `volplugin serve` already uses the root {root}: stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


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
    if len(os.fsencode(path)) >= 108:
        raise StateError(f"socket path {path} is too long for a unix socket: use a shorter name")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if _answers(path, STALE_GRACE):
            raise StateError(f"a server already listens on {path}: stop it or pick another --name")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def serve(
    name: str = DEFAULT_NAME,
    root: Path = DEFAULT_ROOT,
    *,
    plugin_dir: Path = PLUGIN_DIR,
    threads: int = DEFAULT_THREADS,
    workers: int = 1,
    store: str | None = None,
    schedule_tick: float = DEFAULT_TICK,
    cpu_affinity: str = "auto",
    cpu_check: float = CHECK_SECONDS,
) -> None:
    """Serve until SIGTERM or SIGINT; remove the socket on the way out.

    `store` is the backup store URL (None: the layerfs default); scheduled backups are
    looked for every `schedule_tick` seconds. `workers` processes answer requests, each
    with `threads` threads. With `cpu_affinity` "auto" each keeps to a CPU of its own
    while that CPU has room, looking every `cpu_check` seconds, if there are enough
    CPUs for that (volplugin.affinity).
    """
    root = Path(root).absolute()
    cpus = allowed_cpus(cpu_affinity, workers)
    path = socket_path(name, plugin_dir)
    check_repository(store)
    with root_lock(root):
        stop = threading.Event()
        if cpus:
            CpuPin(0, cpus, check=cpu_check).watch(stop)  # threads started later inherit it
        service = _open_service(root, name, store)
        write_record(root, name, store or default_store_url())  # for the CLI (pluginrecord)
        service.empty_trash()
        seed.resume_interrupted(service, store)  # before serving: never half restored
        # Every serving process's commits skip checkpoints; this thread does them.
        checkpointer = checkpoint_in_background(service.state.path, stop)
        if not try_reconcile(service):
            reconcile_in_background(service, stop)
        lazy, app = _attach_app(service, store, background=True)
        sock = bind_socket(path)
        board = LoadBoard.create(root / BOARD_NAME, workers)
        scheduler = Scheduler(service, store, tick=schedule_tick).start(stop)
        verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
        command = worker_command(name, root, threads, store, verbose, cpus, cpu_check)
        pool = WorkerPool(command, sock, workers - 1, board, set(cpus) if cpus else None)
        try:
            server = waitress_server(app, sock, threads, board, 0)
            _exit_on_signals()
            pool.start()
            log.info(
                "serving driver %s on %s, root %s, %d process(es) of %d thread(s)%s",
                name,
                path,
                root,
                workers,
                threads,
                f", each on a CPU of {cpus} while it has room" if cpus else "",
            )
            try:
                _run(server)
            finally:
                stop.set()
                server.close()
                pool.stop()
                scheduler.join(SCHEDULER_GRACE)  # a running backup restarts its containers
                checkpointer.join()
        finally:
            lazy.close()
            board.close()
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            service.state.close()
            log.info("stopped")


def serve_worker(
    name: str,
    root: Path,
    fd: int,
    parent: int,
    slot: int,
    *,
    threads: int = DEFAULT_THREADS,
    store: str | None = None,
    cpus: list[int] | None = None,
    cpu_check: float = CHECK_SECONDS,
) -> None:
    """Serve requests on the inherited listening socket `fd` until SIGTERM or `parent` dies.

    Same app and hooks as the main process; no reconciliation, schedule or lazy fills.
    `slot` is this process's place on the server's LoadBoard; with `cpus` it keeps to
    one of them while it has room (volplugin.affinity).
    """
    die_with_parent(parent)
    stop = threading.Event()
    if cpus:
        CpuPin(slot, cpus, check=cpu_check).watch(stop)
    root = Path(root).absolute()
    sock = socket.socket(fileno=fd)
    board = LoadBoard.attach(root / BOARD_NAME)
    service = _open_service(root, name, store)
    lazy, app = _attach_app(service, store, background=False)
    server = waitress_server(app, sock, threads, board, slot)
    _exit_on_signals()
    log.info("worker process %d serving driver %s, root %s", os.getpid(), name, root)
    try:
        _run(server)
    finally:
        stop.set()
        server.close()
        board.clear(slot)
        board.close()
        lazy.close()
        service.state.close()


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


def _open_service(root: Path, name: str, store: str | None) -> VolumeService:
    """The volumes of `root`, restoring `-o from=` backups from `store` at create."""
    service = VolumeService.open(root, name, autocheckpoint=False)  # see serve()
    seed.attach(service, store)
    return service


def _attach_app(
    service: VolumeService, store: str | None, *, background: bool
) -> tuple[LazyVolumes, Flask]:
    """Lazy volumes (fills only with `background`) and the app serving `service`."""
    lazy = LazyVolumes.attach(service, store, background=background)
    app = create_app(service)
    app.config["LAYERFS_STORE"] = store
    return lazy, app


def waitress_server(
    app: Flask, sock: socket.socket, threads: int, board: LoadBoard, slot: int
) -> BaseWSGIServer:
    """waitress serving `app` on `sock`, as every serving process of `serve` does.

    `slot` is the process's place on `board` (volplugin.balance). The benchmarks'
    floor server is built here too, so that it is served exactly the same way.
    """
    # Under load waitress warns of its queue depth on every request: noise, and costly.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(
        app,
        sockets=[sock],
        threads=threads,
        ident="volplugin",
        max_request_body_size=1024 * 1024,
        backlog=1024,
    )
    server.channel_class = QuietChannel  # see volplugin.channel
    balance(server, board, slot)
    _freeze_startup_objects()
    return server


def _freeze_startup_objects() -> None:
    """Keep what start-up built out of the garbage collector's full collections.

    Modules, the app and the service live as long as the process; frozen, a full
    collection walks only what requests left behind. Unfrozen, those walks paused a
    serving process for 35 to 60 ms a few times a minute under load, and with the
    processes serving in step they paused them together: that set the latency's tail.
    """
    gc.collect()
    gc.freeze()


def _run(server: BaseWSGIServer) -> None:
    """Serve, the access log batched, until SIGTERM or SIGINT (see `_exit_on_signals`)."""
    with batched_access_log(), contextlib.suppress(SystemExit):
        server.run()


def _exit_on_signals() -> None:
    def handler(signum: int, frame: object) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)

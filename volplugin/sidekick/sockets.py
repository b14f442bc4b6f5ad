"""Serving the scoped sockets of volumes created with `-o sidekick-socket=true`.

A volume's socket (volplugin.sidekick.paths) appears when the volume is created, or
when `serve` starts for a volume that has one, and goes when the volume is removed:
the file is unlinked and its listening socket closed, so a container that still has
it bind-mounted gets "connection refused". The file is owned by the volume's `uid`
and `gid` options (default root), mode 0660; its directory is mode 0711.

Each socket has its own small waitress server (SIDEKICK_THREADS request threads and a
loop thread, all daemon threads) serving a ScopeGuard bound to the volume in front of
the plugin's app. A server per socket keeps the scope out of the request altogether
(no telling sockets apart by what waitress puts in the environ), and lets sockets come
and go while the plugin runs, which one waitress server over a fixed list of sockets
cannot. A server is stopped by shutting down and closing its listening socket
(waitress has no stop of its own; `asyncore_use_poll` makes its loop tolerate a socket
closed under it): its loop thread ends once its connections are closed. Measured: a
socket costs 3 threads and about 100 KB; 50 sockets opened and closed again leave the
process as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask

from volplugin.protocol.app import ACCESS_EXTENSION
from volplugin.sidekick.paths import check_directory, socket_path, wants_socket
from volplugin.sidekick.scope import ScopeGuard
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord

SIDEKICK_THREADS = 2  # requests at once on one volume's socket (a long poll holds one)
SOCKET_MODE = 0o660
DIR_MODE = 0o711  # reachable by a socket's owner; not listable

log = logging.getLogger("volplugin.sidekick")


@dataclass
class _Served:
    path: Path
    sock: socket.socket  # the listening socket
    server: Any  # a waitress server
    thread: threading.Thread


class SidekickSockets:
    """The scoped sockets of one plugin, by volume name."""

    def __init__(self, service: VolumeService, app: Flask, store: str | None, directory: Path):
        self.service = service
        self.app = app
        self.store = store
        self.directory = Path(directory).absolute()
        self._served: dict[str, _Served] = {}
        self._lock = threading.Lock()

    @classmethod
    def attach(
        cls, service: VolumeService, app: Flask, store: str | None, directory: Path
    ) -> SidekickSockets:
        """Serve the sockets of existing volumes that ask for one, and follow the volumes'
        creation and removal (through the service's hooks) from now on."""
        check_directory(directory)
        sockets = cls(service, app, store, directory)
        for record in service.list():
            if wants_socket(record.options):
                try:
                    sockets.open(record)
                except OSError as exc:  # one volume's socket does not stop the plugin
                    log.error("volume %s: cannot serve its sidekick socket: %s", record.name, exc)
        service.hooks.on_create.append(lambda record, path: sockets.open(record))
        service.hooks.on_remove.append(lambda record, path: sockets.close_one(record.name))
        service.hooks.status.append(sockets.status)
        return sockets

    def path_of(self, name: str) -> Path:
        return socket_path(self.directory, name)

    def status(self, record: VolumeRecord) -> dict:
        """`SidekickSocket` in the Status of volumes that have one."""
        if not wants_socket(record.options):
            return {}
        return {"SidekickSocket": str(self.path_of(record.name))}

    def open(self, record: VolumeRecord) -> None:
        """Serve `record`'s scoped socket, if its options ask for one."""
        if not wants_socket(record.options):
            return
        import waitress

        from volplugin.server import bind_socket

        with self._lock:
            if record.name in self._served:
                return
            path = self.path_of(record.name)
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if path.is_dir() and not path.is_symlink():
                # docker makes a missing bind-mount source a directory: a sidekick
                # started before its volume left one
                with contextlib.suppress(OSError):
                    path.rmdir()
            sock = bind_socket(path)
            try:
                uid, gid = int(record.options.get("uid", 0)), int(record.options.get("gid", 0))
                os.chown(path, uid, gid, follow_symlinks=False)
                os.chmod(path, SOCKET_MODE)
                access = self.app.extensions[ACCESS_EXTENSION]
                guard = ScopeGuard(
                    self.app, record.name, self.service, self.store, access.observers
                )
                server = waitress.create_server(
                    guard,
                    sockets=[sock],
                    threads=SIDEKICK_THREADS,
                    ident="volplugin-sidekick",
                    asyncore_use_poll=True,  # its socket may be closed from another thread
                )
            except BaseException:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                raise
            thread = threading.Thread(
                target=server.run, name=f"sidekick {record.name[:32]}", daemon=True
            )
            thread.start()
            self._served[record.name] = _Served(path, sock, server, thread)
        log.info("volume %s: sidekick socket %s", record.name, path)

    def close_one(self, name: str) -> None:
        """Stop serving volume `name`'s socket and remove its file."""
        with self._lock:
            served = self._served.pop(name, None)
        if served is None:
            return
        with contextlib.suppress(FileNotFoundError):
            served.path.unlink()
        # Refused from now on: the loop thread's poll holds the socket until it wakes, so
        # closing it alone would let connections in for a moment and then drop them.
        with contextlib.suppress(OSError):
            served.sock.shutdown(socket.SHUT_RDWR)
        served.server.close()
        served.server.task_dispatcher.shutdown()
        log.info("volume %s: sidekick socket %s closed", name, served.path)

    def close(self) -> None:
        """Stop every socket (the plugin is stopping)."""
        for name in list(self._served):
            self.close_one(name)

"""Spread keep-alive connections evenly over the processes serving one socket.

Every serving process waits on the same listening socket, and the kernel gives each
new connection to whichever process calls accept() first. A client that keeps its
connections open (the Docker daemon's plugin client does, as does curl) then stays
with that split. Measured with 20 curl connections on 4 processes, one process held 12
of them and another none, so the busy one's clients waited while a core sat idle.

A LoadBoard is a small file under the root, mapped into every serving process, with one
slot per process: its pid, its open connections and when it last wrote (the monotonic
clock, which all processes share). `balance` makes a server offer to accept only while
no other live process holds fewer connections. A slot that has not been written for
STALE seconds is ignored: every server writes its slot at least once a second (its
event loop wakes that often), so only a hung or dead process goes stale, and the pool
clears the slot of a worker it sees exit. Reads take no lock: a slot read while it is
being written costs one wrong decision, mended at the next turn of the loop.

A process that stopped listening decided so when it last woke, and an idle one sleeps
up to a second. Meanwhile the others may fill up until none of them listens, and new
connections would wait in the backlog for that sleeper (measured: first answers up to
0.8 s late, once the daemon's idle connections had made the counts uneven). So a
process that stops listening because others hold fewer connections wakes them: each
process has a datagram socket in its event loop, at an abstract address named after
the board, its slot and its pid.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from waitress import wasyncore
from waitress.server import BaseWSGIServer

SLOT = struct.Struct("=iid")  # pid, open connections, monotonic time of the last write
STALE = 3.0  # seconds after which a slot no longer counts

log = logging.getLogger("volplugin.balance")


@dataclass
class LoadBoard:
    """The shared slots, one per serving process."""

    _map: mmap.mmap
    ident: int  # the board file's inode: names the processes' wake-up addresses

    @property
    def slots(self) -> int:
        return len(self._map) // SLOT.size

    @classmethod
    def create(cls, path: Path, slots: int) -> LoadBoard:
        """A fresh board (all slots empty) at `path`, for the main server process."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SLOT.size * slots)
            return cls(mmap.mmap(fd, SLOT.size * slots), os.fstat(fd).st_ino)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: Path) -> LoadBoard:
        """The board the main process created, for a worker process."""
        fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            return cls(mmap.mmap(fd, st.st_size), st.st_ino)
        finally:
            os.close(fd)

    def wake_address(self, slot: int, pid: int) -> str:
        """The abstract unix address where the process `pid` in `slot` takes wake-ups."""
        return f"\0volplugin-balance-{self.ident}-{slot}-{pid}"

    def write(self, slot: int, pid: int, connections: int, now: float) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, pid, connections, now)

    def clear(self, slot: int) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, 0, 0, 0.0)

    def fewer_elsewhere(self, slot: int, mine: int, now: float) -> list[tuple[int, int]]:
        """(slot, pid) of every other live process holding fewer than `mine` connections."""
        return [
            (index, pid)
            for index, (pid, connections, written) in enumerate(SLOT.iter_unpack(self._map))
            if index != slot and pid and now - written <= STALE and connections < mine
        ]

    def close(self) -> None:
        self._map.close()


class _Wakeups(wasyncore.dispatcher):
    """A datagram socket in a server's event loop: any datagram wakes the loop."""

    def __init__(self, address: str, server_map: dict) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        super().__init__(sock, map=server_map)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.socket.recv(16)


def balance(server: BaseWSGIServer, board: LoadBoard, slot: int) -> None:
    """Let `server` accept a connection only while no other process holds fewer.

    waitress's event loop asks the listening dispatcher `readable()` before each wait,
    so that is where the server writes its slot and decides whether to listen. When
    several processes tie for fewest they all listen; one wins the accept() and the
    others get EAGAIN, which waitress ignores. Stopping for others' sake, it wakes them.
    Closing the server closes the wake-up sockets too.
    """
    accepting, closing = server.readable, server.close
    pid = os.getpid()  # the serving process's, looked up once (the floor forks first)
    try:
        wakeups: _Wakeups | None = _Wakeups(board.wake_address(slot, pid), server._map)
    except OSError as exc:  # still balanced; an idle process may take a second to accept
        wakeups = None
        log.warning("serving process %d cannot take wake-ups (%s): balancing without", pid, exc)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    listening = True

    def readable() -> bool:
        nonlocal listening
        ready = accepting()  # waitress's own checks (connection limit, maintenance)
        now = time.monotonic()
        mine = len(server.active_channels)
        board.write(slot, pid, mine, now)
        fewer = board.fewer_elsewhere(slot, mine, now)
        if listening and fewer:
            for other, other_pid in fewer:
                with contextlib.suppress(OSError):  # gone, or a wake-up is already queued
                    sender.sendto(b"!", board.wake_address(other, other_pid))
        listening = ready and not fewer
        return listening

    def close() -> None:
        if wakeups is not None:
            wakeups.close()
        sender.close()
        closing()

    server.readable = readable  # type: ignore[method-assign]
    server.close = close  # type: ignore[method-assign]

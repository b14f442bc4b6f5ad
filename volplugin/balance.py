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
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from waitress.server import BaseWSGIServer

SLOT = struct.Struct("=iid")  # pid, open connections, monotonic time of the last write
STALE = 3.0  # seconds after which a slot no longer counts


@dataclass
class LoadBoard:
    """The shared slots; `slots` of them, one per serving process."""

    _map: mmap.mmap
    slots: int

    @classmethod
    def create(cls, path: Path, slots: int) -> LoadBoard:
        """A fresh board (all slots empty) at `path`, for the main server process."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, SLOT.size * slots)
            return cls(mmap.mmap(fd, SLOT.size * slots), slots)
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: Path) -> LoadBoard:
        """The board the main process created, for a worker process."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            return cls(mmap.mmap(fd, size), size // SLOT.size)
        finally:
            os.close(fd)

    def write(self, slot: int, connections: int, now: float) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, os.getpid(), connections, now)

    def clear(self, slot: int) -> None:
        SLOT.pack_into(self._map, slot * SLOT.size, 0, 0, 0.0)

    def fewest_elsewhere(self, slot: int, now: float) -> int | None:
        """The fewest connections any other live process holds; None if there is none."""
        fewest = None
        for index, (pid, connections, written) in enumerate(SLOT.iter_unpack(self._map)):
            if index == slot or not pid or now - written > STALE:
                continue
            if fewest is None or connections < fewest:
                fewest = connections
        return fewest

    def close(self) -> None:
        self._map.close()


def balance(server: BaseWSGIServer, board: LoadBoard, slot: int) -> None:
    """Let `server` accept a connection only while no other process holds fewer.

    waitress's event loop asks the listening dispatcher `readable()` before each wait,
    so that is where the server writes its slot and decides whether to listen. When
    several processes tie for fewest they all listen; one wins the accept() and the
    others get EAGAIN, which waitress ignores.
    """
    accepting = server.readable

    def readable() -> bool:
        ready = accepting()  # waitress's own checks (connection limit, maintenance)
        now = time.monotonic()
        mine = len(server.active_channels)
        board.write(slot, mine, now)
        fewest = board.fewest_elsewhere(slot, now)
        return ready and (fewest is None or mine <= fewest)

    server.readable = readable  # type: ignore[method-assign]

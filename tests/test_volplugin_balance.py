"""volplugin.balance: the load board's slots and the accept decision built on them.

The spread of real connections over real processes is tested through `volplugin serve`
in test_volplugin_workers.py; here the rules, with the clock given, and the wake-up
between two real waitress servers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from waitress import wasyncore

from tests.support.waiting import wait_for
from volplugin.balance import SLOT, STALE, LoadBoard, balance
from volplugin.server import waitress_server


class FakeServer:
    """What `balance` uses of a waitress server: readable(), its map and active_channels."""

    def __init__(self, accepting: bool = True) -> None:
        self.accepting = accepting
        self.active_channels: dict[int, object] = {}
        self._map: dict[int, object] = {}

    def readable(self) -> bool:
        return self.accepting

    def close(self) -> None:
        pass


def test_a_worker_sees_the_slots_the_main_process_writes(tmp_path: Path) -> None:
    main = LoadBoard.create(tmp_path / "board", 3)
    worker = LoadBoard.attach(tmp_path / "board")
    assert worker.slots == 3
    main.write(0, os.getpid(), 5, 100.0)
    worker.write(1, os.getpid(), 2, 100.0)
    me = os.getpid()
    assert main.fewer_elsewhere(0, 5, 100.5) == [(1, me)]
    assert main.fewer_elsewhere(0, 2, 100.5) == []  # a tie is not fewer
    assert worker.fewer_elsewhere(1, 6, 100.5) == [(0, me)]
    assert worker.fewer_elsewhere(2, 9, 100.5) == [(0, me), (1, me)]


def test_empty_stale_and_own_slots_do_not_count(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 3)
    assert board.fewer_elsewhere(0, 5, 10.0) == []  # nobody else yet
    board.write(0, os.getpid(), 0, 10.0)
    assert board.fewer_elsewhere(0, 5, 10.0) == []  # only itself
    board.write(1, os.getpid(), 1, 10.0)
    assert board.fewer_elsewhere(0, 5, 10.0 + STALE - 0.1) == [(1, os.getpid())]
    assert board.fewer_elsewhere(0, 5, 10.0 + STALE + 0.1) == []  # hung or dead
    board.clear(1)
    assert board.fewer_elsewhere(0, 5, 10.0) == []


def test_create_starts_from_empty_slots(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 2)
    board.write(1, os.getpid(), 7, 10.0)
    board.close()
    again = LoadBoard.create(tmp_path / "board", 2)  # a restarted server
    assert again.fewer_elsewhere(0, 5, 10.0) == []


@contextlib.contextmanager
def balanced(board: LoadBoard, accepting: bool = True) -> Iterator[FakeServer]:
    """A FakeServer in slot 0 of `board`, closed (its wake-up sockets too) afterwards."""
    server = FakeServer(accepting)
    balance(server, board, 0)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()


def test_a_server_listens_only_while_no_other_process_has_fewer(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 2)
    with balanced(board) as server:
        assert server.readable()  # alone on the board
        board.write(1, os.getpid(), 1, time.monotonic())
        server.active_channels = {1: object()}
        assert server.readable()  # a tie: both listen
        server.active_channels = {1: object(), 2: object()}
        assert not server.readable()  # the other process has fewer
        board.write(1, os.getpid(), 3, time.monotonic())
        assert server.readable()
    # each call wrote the server's own count to its slot
    others = LoadBoard.attach(tmp_path / "board").fewer_elsewhere(1, 3, time.monotonic())
    assert others == [(0, os.getpid())]


def test_waitress_saying_no_wins(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 1)
    with balanced(board, accepting=False) as server:  # e.g. at its connection limit
        assert not server.readable()


def _answering(name: bytes):  # a WSGI app saying which server answered
    def app(environ: dict, start_response) -> list[bytes]:
        start_response("200 OK", [("Content-Length", str(len(name)))])
        return [name]

    return app


def _ask(path: Path) -> tuple[socket.socket, bytes]:
    """Connect, send one request and read its answer; the connection is kept open."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)  # a loop asleep for its whole 30 s timeout fails the test
    conn.connect(str(path))
    return conn, _again(conn)


def _again(conn: socket.socket) -> bytes:
    """One more request on `conn`; the name of the server that answered."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith((b"\r\n\r\na", b"\r\n\r\nb")):
        answer += conn.recv(1024)
    return answer[-1:]


def _settled(board: LoadBoard, slot: int, since: float) -> bool:
    """Whether the server in `slot` has written its slot since `since`, then stopped."""
    written = SLOT.unpack_from(board._map, slot * SLOT.size)[2]
    time.sleep(0.2)
    return written > since and SLOT.unpack_from(board._map, slot * SLOT.size)[2] == written


def test_a_server_that_stops_listening_wakes_those_with_fewer(tmp_path: Path) -> None:
    """Two real waitress servers on one socket, each asleep up to 30 s when idle.

    A holds one connection and, seeing B hold none, stops listening and sleeps. B takes
    the next two, then holds more than A and stops too. Unless B woke A, the fourth
    connection would wait in the backlog for A's sleep to end.
    """
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    board = LoadBoard.create(tmp_path / "board", 2)
    servers = [
        waitress_server(_answering(name), listener.dup(), 1, board, slot)
        for slot, name in enumerate([b"a", b"b"])
    ]
    stop = threading.Event()

    def loop(server) -> None:  # BaseWSGIServer.run, with a 30 s wait when idle
        while not stop.is_set():
            wasyncore.loop(timeout=30.0, map=server._map, count=1)

    threads = [threading.Thread(target=loop, args=(s,), daemon=True) for s in servers]
    conns = []
    try:
        threads[0].start()
        conn, by = _ask(path)
        conns.append(conn)
        assert by == b"a"
        threads[1].start()
        wait_for(lambda: board.fewer_elsewhere(0, 1, time.monotonic()), "B on the board", 10)
        # A answers on its connection, then looks at the board: B holds fewer
        since = time.monotonic()
        assert _again(conn) == b"a"
        wait_for(lambda: _settled(board, 0, since), "A to fall asleep", 10)
        for expected in [b"b", b"b", b"a"]:
            conn, by = _ask(path)
            conns.append(conn)
            assert by == expected
    finally:
        for conn in conns:
            conn.close()
        stop.set()
        for server, thread in zip(servers, threads, strict=True):
            server.pull_trigger()
            if thread.is_alive():
                thread.join(10)
            server.close()
            server.task_dispatcher.shutdown()
        board.close()
        listener.close()


def test_without_wake_ups_a_server_still_balances(tmp_path: Path, caplog) -> None:
    board = LoadBoard.create(tmp_path / "board", 2)
    taken = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    taken.bind(board.wake_address(0, os.getpid()))  # the address is not free
    try:
        with balanced(board) as server:
            assert "cannot take wake-ups" in caplog.text
            board.write(1, os.getpid(), 0, time.monotonic())
            server.active_channels = {1: object()}
            assert not server.readable()  # the other process has fewer
    finally:
        taken.close()


def test_closing_the_server_frees_its_wake_up_address(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 1)
    address = board.wake_address(0, os.getpid())
    with balanced(board):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with pytest.raises(OSError):
            probe.bind(address)  # held by the server
        probe.close()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    probe.bind(address)  # free again
    probe.close()

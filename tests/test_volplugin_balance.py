"""volplugin.balance: the load board's slots and the accept decision built on them.

The spread of real connections over real processes is tested through `volplugin serve`
in test_volplugin_workers.py; here the rules, with the clock given.
"""

from __future__ import annotations

import time
from pathlib import Path

from volplugin.balance import STALE, LoadBoard, balance


class FakeServer:
    """What `balance` uses of a waitress server: readable() and active_channels."""

    def __init__(self, accepting: bool = True) -> None:
        self.accepting = accepting
        self.active_channels: dict[int, object] = {}

    def readable(self) -> bool:
        return self.accepting


def test_a_worker_sees_the_slots_the_main_process_writes(tmp_path: Path) -> None:
    main = LoadBoard.create(tmp_path / "board", 3)
    worker = LoadBoard.attach(tmp_path / "board")
    assert worker.slots == 3
    main.write(0, 5, 100.0)
    worker.write(1, 2, 100.0)
    assert main.fewest_elsewhere(0, 100.5) == 2
    assert worker.fewest_elsewhere(1, 100.5) == 5
    assert worker.fewest_elsewhere(2, 100.5) == 2


def test_empty_stale_and_own_slots_do_not_count(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 3)
    assert board.fewest_elsewhere(0, 10.0) is None  # nobody else yet
    board.write(0, 0, 10.0)
    assert board.fewest_elsewhere(0, 10.0) is None  # only itself
    board.write(1, 1, 10.0)
    assert board.fewest_elsewhere(0, 10.0 + STALE - 0.1) == 1
    assert board.fewest_elsewhere(0, 10.0 + STALE + 0.1) is None  # hung or dead
    board.clear(1)
    assert board.fewest_elsewhere(0, 10.0) is None


def test_create_starts_from_empty_slots(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 2)
    board.write(1, 7, 10.0)
    board.close()
    again = LoadBoard.create(tmp_path / "board", 2)  # a restarted server
    assert again.fewest_elsewhere(0, 10.0) is None


def test_a_server_listens_only_while_no_other_process_has_fewer(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 2)
    server = FakeServer()
    balance(server, board, 0)  # type: ignore[arg-type]
    assert server.readable()  # alone on the board
    board.write(1, 1, time.monotonic())
    server.active_channels = {1: object()}
    assert server.readable()  # a tie: both listen
    server.active_channels = {1: object(), 2: object()}
    assert not server.readable()  # the other process has fewer
    board.write(1, 3, time.monotonic())
    assert server.readable()
    # each call wrote the server's own count to its slot
    assert LoadBoard.attach(tmp_path / "board").fewest_elsewhere(1, time.monotonic()) == 2


def test_waitress_saying_no_wins(tmp_path: Path) -> None:
    board = LoadBoard.create(tmp_path / "board", 1)
    server = FakeServer(accepting=False)  # e.g. at its connection limit
    balance(server, board, 0)  # type: ignore[arg-type]
    assert not server.readable()

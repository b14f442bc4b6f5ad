"""Every serving process freezes what start-up built out of the garbage collector's view.

Unfrozen, each full collection walked the modules, the app and the service, and paused
a serving process for tens of milliseconds under load; `waitress_server` builds every
serving process (and the benchmarks' floor), so it is where the freeze happens.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from volplugin.balance import LoadBoard
from volplugin.server import waitress_server


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave the test process as it was


def test_building_a_server_freezes_what_exists(tmp_path: Path, unfrozen: None) -> None:
    app = Flask(__name__)
    built_before = ["a container, so the collector tracks it"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s.sock"))
    board = LoadBoard.create(tmp_path / "board", 1)
    assert gc.get_freeze_count() == 0
    assert any(o is built_before for o in gc.get_objects())
    server = waitress_server(app, sock, 1, board, 0)
    try:
        assert gc.get_freeze_count() > 0
        # frozen: no collection walks it any more
        assert not any(o is built_before for o in gc.get_objects())
    finally:
        server.close()
        board.close()
        sock.close()

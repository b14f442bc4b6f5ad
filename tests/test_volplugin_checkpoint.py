"""The state database's log is checkpointed off the request path.

A commit that finds SQLite's write-ahead log long enough copies it into the database
and syncs both files; the serving processes turn that off (State(autocheckpoint=False))
and the main process checkpoints from a thread of its own (checkpoint_in_background).
What a checkpoint has copied is what the database file itself holds, read here with
SQLite's `immutable` flag, which ignores the log.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from tests.support.plugin import post, running_plugin, without_docker
from tests.support.waiting import wait_for
from volplugin.state import State, checkpoint_in_background

MOUNTS = 1000  # enough commits to pass SQLite's automatic checkpoint (1000 log pages)


def mounts_in_the_file(db: Path) -> int:
    """Mount rows in the database file alone; 0 while they exist only in the log."""
    try:
        conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
        try:
            return conn.execute("SELECT COUNT(*) FROM mounts").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # no table yet, or a page caught mid-copy: read again
        return 0


def mount_many(state: State) -> None:
    state.add("v", {}, "2026-01-01T00:00:00Z")
    for i in range(MOUNTS):
        state.add_mount("v", f"id-{i}")


def test_commits_checkpoint_by_default(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    mount_many(state)
    assert mounts_in_the_file(tmp_path / "state.db") > 0
    state.close()


def test_without_autocheckpoint_only_the_background_thread_copies_the_log(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    state = State(db, autocheckpoint=False)
    mount_many(state)
    assert mounts_in_the_file(db) == 0  # all of it is still in the log
    stop = threading.Event()
    thread = checkpoint_in_background(db, stop, interval=0.05)
    try:
        wait_for(lambda: mounts_in_the_file(db) == MOUNTS, "the checkpoint", timeout=30)
    finally:
        stop.set()
        thread.join()
    state.close()


def test_a_serving_plugin_checkpoints_its_state(tmp_path: Path) -> None:
    env = without_docker(tmp_path)
    with running_plugin(tmp_path / "root", env=env) as plugin:
        sock = str(plugin.socket)
        assert post(sock, "VolumeDriver.Create", {"Name": "v"})[0] == 200
        for i in range(20):  # far too few commits for SQLite to checkpoint by itself
            assert post(sock, "VolumeDriver.Mount", {"Name": "v", "ID": f"c{i}"})[0] == 200
        db = plugin.root / "state.db"
        wait_for(lambda: mounts_in_the_file(db) == 20, "the server's checkpoint", timeout=30)

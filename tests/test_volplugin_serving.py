"""How the server answers under load: its batched access log and its quiet event loop.

Unit tests pin the mechanisms (volplugin.accesslog, volplugin.channel); the rest go
through a real `volplugin serve` on its unix socket.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import threading
import time

import pytest
from waitress.adjustments import Adjustments

from tests.support.plugin import (
    ACCESS_MARK,
    PluginProcess,
    UnixHTTPConnection,
    post,
    running_plugin,
    without_docker,
)
from volplugin.accesslog import ACCESS_LOGGER, BatchedStreamHandler, batched_access_log
from volplugin.channel import QuietChannel


def test_batched_handler_writes_only_when_flushed() -> None:
    out = io.StringIO()
    handler = BatchedStreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.Logger("t")
    logger.addHandler(handler)
    logger.info("one")
    logger.info("two")
    assert out.getvalue() == ""
    handler.flush()
    assert out.getvalue() == "t: one\nt: two\n"
    handler.flush()
    assert out.getvalue() == "t: one\nt: two\n"


def test_batched_access_log_flushes_on_its_interval_and_at_the_end(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    access = logging.getLogger(ACCESS_LOGGER)
    with batched_access_log(interval=0.05):
        access.warning("early")
        deadline = time.monotonic() + 5
        while "early" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "early" in out.getvalue()
        access.warning("late")
    assert out.getvalue().count("late") == 1
    assert access.propagate and not access.handlers


def _fake_channel(lock: threading.Condition) -> QuietChannel:
    """A channel with output waiting, without a socket or an event loop."""
    channel = QuietChannel.__new__(QuietChannel)
    channel.adj = Adjustments()
    channel.outbuf_lock = lock
    channel.total_outbufs_len = 10
    channel.will_close = False
    channel.close_when_flushed = False
    return channel


def test_channel_is_not_writable_while_a_task_holds_its_output() -> None:
    lock = threading.Condition()
    channel = _fake_channel(lock)
    assert channel.writable()
    held, done = threading.Event(), threading.Event()

    def task() -> None:
        with lock:
            held.set()
            done.wait(5)

    thread = threading.Thread(target=task)
    thread.start()
    held.wait(5)
    try:
        assert not channel.writable()
    finally:
        done.set()
        thread.join()
    assert channel.writable()
    channel.total_outbufs_len = 0
    assert not channel.writable()


@pytest.fixture
def plugin(tmp_path):
    env = without_docker(tmp_path)
    with running_plugin(tmp_path / "root", env=env) as p:
        yield p


def test_an_answer_bigger_than_the_socket_buffer_reaches_a_late_reader(plugin) -> None:
    # 2,500 volumes make a List answer of about 300 KB, more than a unix socket buffers:
    # the task thread cannot send it all, and the event loop must send the rest once
    # the client reads.
    sock_path = str(plugin.socket)
    creator = UnixHTTPConnection(sock_path)
    for i in range(2500):
        creator.request("POST", "/VolumeDriver.Create", body=json.dumps({"Name": f"v{i:04d}"}))
        assert creator.getresponse().read() == b'{"Err": ""}'
    creator.close()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    conn.sendall(b"POST /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    time.sleep(2)  # the server fills the socket and must wait for us
    conn.settimeout(30)
    data = b""
    marker = b'{"Volumes": ['
    while True:
        chunk = conn.recv(1 << 16)
        assert chunk, "the server closed the connection before the List answer was whole"
        data += chunk
        if marker in data and data.rstrip().endswith(b"}"):
            try:
                doc = json.loads(data[data.index(marker) :])
                break
            except ValueError:
                continue
    conn.close()
    assert len(doc["Volumes"]) == 2500
    assert len(data) > 300_000
    status, listed = post(sock_path, "VolumeDriver.List")
    assert status == 200 and len(listed["Volumes"]) == 2500


def test_access_lines_written_before_a_stop_are_not_lost(tmp_path) -> None:
    env = without_docker(tmp_path)
    plugin = PluginProcess(tmp_path / "root", env=env).start()
    try:
        for i in range(50):
            assert plugin.call("VolumeDriver.Create", {"Name": f"stop{i}"})[0] == 200
        plugin.stop(signal.SIGTERM)  # at once: the lines are still in memory
        lines = [line for line in plugin.log().splitlines() if ACCESS_MARK in line]
        docs = [json.loads(line.split(ACCESS_MARK, 1)[1]) for line in lines]
        creates = [doc for doc in docs if doc["endpoint"] == "/VolumeDriver.Create"]
        assert sorted(doc["volume"] for doc in creates) == sorted(f"stop{i}" for i in range(50))
    finally:
        plugin.cleanup()

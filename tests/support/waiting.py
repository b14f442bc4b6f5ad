"""Polling with a deadline, for tests that wait on real daemons and processes (and stop them)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    check: Callable[[], T],
    what: str,
    timeout: float = 120.0,
    guard: Callable[[], bool] | None = None,
    interval: float = 0.05,
) -> T:
    """Poll ``check`` until it returns something true and return that.

    Fails when ``timeout`` passes, or when ``guard`` turns false first (say, the
    process being watched ended).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if guard is not None and not guard():
            raise AssertionError(f"gave up waiting for {what}: the process ended first")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it if it is not gone within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

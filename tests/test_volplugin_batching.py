"""volplugin.batching: operations of many threads run in batches under one lock hold."""

from __future__ import annotations

import threading
import time

import pytest

from volplugin.batching import Batcher


class SlowLock:
    """A lock that takes a moment to acquire, so that callers pile up behind it."""

    def __init__(self, fail: bool = False) -> None:
        self._lock = threading.Lock()
        self.fail = fail
        self.holders = 0

    def __enter__(self) -> SlowLock:
        if self.fail:
            raise OSError("the lock file is gone")
        self._lock.acquire()
        time.sleep(0.01)
        self.holders += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_results_and_errors_reach_their_own_callers() -> None:
    batcher = Batcher(SlowLock())
    assert batcher.run(lambda: 41 + 1) == 42
    with pytest.raises(KeyError, match="nope"):
        batcher.run(lambda: {}["nope"])
    assert batcher.batches == 2


def test_every_operation_runs_once_in_order_and_calls_are_batched() -> None:
    lock = SlowLock()
    batcher = Batcher(lock)
    ran: list[tuple[int, int]] = []
    answers: dict[tuple[int, int], object] = {}

    def op(thread: int, i: int) -> tuple[int, int]:
        ran.append((thread, i))
        if i % 7 == 3:
            raise ValueError(f"op {thread}/{i} fails")
        return (thread, i)

    def client(thread: int) -> None:
        for i in range(20):
            try:
                answers[(thread, i)] = batcher.run(lambda i=i: op(thread, i))
            except ValueError as exc:
                answers[(thread, i)] = str(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ran) == [(n, i) for n in range(30) for i in range(20)]
    for (n, i), answer in answers.items():
        assert answer == (f"op {n}/{i} fails" if i % 7 == 3 else (n, i))
    for n in range(30):  # each thread's operations ran in the order it made them
        assert [i for t, i in ran if t == n] == list(range(20))
    assert lock.holders == batcher.batches < 600  # some batches ran several operations


def test_an_error_of_the_lock_is_every_callers_error_and_does_not_stick() -> None:
    lock = SlowLock(fail=True)
    batcher = Batcher(lock)
    with pytest.raises(OSError, match="the lock file is gone"):
        batcher.run(lambda: "never")
    lock.fail = False
    assert batcher.run(lambda: "again") == "again"

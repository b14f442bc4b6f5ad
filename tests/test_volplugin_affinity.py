"""volplugin.affinity's pieces: reading a CPU's busy time, judging a check, choosing CPUs.

The real path (a server letting go of a crowded CPU and coming back) is in
test_volplugin_workers.py.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest

from volplugin import affinity
from volplugin.affinity import CLOCK_TICKS, CpuPin, Sample, allowed_cpus, cpu_busy_seconds, shares

STAT = """cpu  900 10 300 5000 40 5 6 7 0 0
cpu0 500 5 100 2000 20 2 3 4 0 0
cpu1 400 5 200 3000 20 3 3 3 0 0
intr 12345
"""


def test_a_cpus_busy_time_leaves_out_idle_io_wait_and_stolen_time(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    assert cpu_busy_seconds(0, str(stat)) == (500 + 5 + 100 + 2 + 3) / CLOCK_TICKS
    assert cpu_busy_seconds(1, str(stat)) == (400 + 5 + 200 + 3 + 3) / CLOCK_TICKS
    with pytest.raises(ValueError, match="no line for CPU 2"):
        cpu_busy_seconds(2, str(stat))


def test_the_real_proc_stat_reads():
    cpu = min(os.sched_getaffinity(0))
    assert cpu_busy_seconds(cpu) > 0


def test_a_check_splits_the_cpu_between_this_process_and_other_work():
    before = Sample(busy=10.0, own=3.0, at=100.0)
    after = Sample(busy=11.6, own=3.4, at=102.0)  # 1.6 s busy in 2 s, 0.4 s of it ours
    own, others = shares(before, after)
    assert own == pytest.approx(0.2)
    assert others == pytest.approx(0.6)
    assert shares(after, after) == (0.0, 0.0)


def test_cpus_are_chosen_by_slot_round_robin():
    assert CpuPin(0, [2, 5]).cpu == 2
    assert CpuPin(1, [2, 5]).cpu == 5
    assert CpuPin(2, [2, 5]).allowed == {2, 5}


def test_pinning_needs_a_cpu_for_each_process():
    cpus = sorted(os.sched_getaffinity(0))
    assert allowed_cpus("off", 1) is None
    assert allowed_cpus("auto", len(cpus) + 1) is None
    assert allowed_cpus("auto", len(cpus)) == (cpus if len(cpus) > 1 else None)
    with pytest.raises(ValueError, match="mode 'always': use one of auto, off"):
        allowed_cpus("always", 1)


def test_a_process_that_cannot_keep_to_its_cpu_says_so_and_lets_the_kernel_place_it(
    monkeypatch, caplog
):
    calls: list[set[int]] = []
    monkeypatch.setattr(affinity, "set_all_threads", calls.append)

    def gone(cpu: int, stat: str = "/proc/stat") -> float:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(affinity, "cpu_busy_seconds", gone)
    with caplog.at_level(logging.WARNING, logger="volplugin.affinity"):
        watcher = CpuPin(1, [0, 1], check=0.01).watch(threading.Event())
        watcher.join(5)
    assert not watcher.is_alive()
    assert calls == [{1}, {0, 1}]
    assert "cannot keep to CPU 1" in caplog.text

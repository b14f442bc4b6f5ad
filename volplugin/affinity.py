"""Keeping a serving process on one CPU while that CPU has room for it.

A Python process hands its interpreter lock from thread to thread many times per
request. When all its threads share one core those hand-offs stay on that core and
its caches stay warm: measured on 2 cores under 20 clients, less CPU per request and a
lower p99 (benchmarks/RESULTS.md). But a pinned process cannot leave a core that other
work keeps busy. So each serving process pins itself to a CPU of its own (by its slot
on the server's load board) and watches that CPU: when other work used more than
CROWDED of it during a check in which the process itself had work (BUSY), the process
lets all its threads run on any allowed CPU for BACKOFF_CHECKS checks, then pins them
again and goes on watching. An idle process stays where it is: it would gain nothing
by moving.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("volplugin.affinity")

CHECK_SECONDS = 2.0  # how often a pinned process looks at its CPU
CROWDED = 0.5  # share of the CPU other work may use before the process lets go of it
BUSY = 0.1  # ... while the process itself used at least this share (an idle one stays)
BACKOFF_CHECKS = 15  # checks a process stays unpinned after letting go
MODES = ("auto", "off")  # serve --cpu-affinity
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_busy_seconds(cpu: int, stat: str = "/proc/stat") -> float:
    """Seconds `cpu` has run anything since boot: not idle, waiting for I/O or stolen."""
    prefix = f"cpu{cpu} "
    with open(stat) as f:
        for line in f:
            if line.startswith(prefix):
                ticks = [int(v) for v in line.split()[1:]]
                idle, iowait = ticks[3], ticks[4]
                steal = ticks[7] if len(ticks) > 7 else 0
                return (sum(ticks[:8]) - idle - iowait - steal) / CLOCK_TICKS
    raise ValueError(f"no line for CPU {cpu} in {stat}")


@dataclass(frozen=True)
class Sample:
    """What a check reads: the CPU's busy seconds, this process's CPU seconds, the time."""

    busy: float
    own: float
    at: float

    @classmethod
    def take(cls, cpu: int) -> Sample:
        return cls(cpu_busy_seconds(cpu), time.process_time(), time.monotonic())


def shares(before: Sample, after: Sample) -> tuple[float, float]:
    """The shares of the CPU this process and other work used between the two samples.

    While pinned, all of this process's CPU time was spent on that CPU; the rest of
    the CPU's busy time was other work's.
    """
    elapsed = after.at - before.at
    if elapsed <= 0:
        return 0.0, 0.0
    own = (after.own - before.own) / elapsed
    return own, (after.busy - before.busy) / elapsed - own


def set_all_threads(cpus: set[int]) -> None:
    """Set the CPUs of every thread of this process (a new thread inherits its creator's)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(tid), cpus)


class CpuPin:
    """One serving process's CPU: `cpus[slot]`, round-robin, of the CPUs it may use."""

    def __init__(
        self,
        slot: int,
        cpus: list[int],
        *,
        check: float = CHECK_SECONDS,
        backoff: int = BACKOFF_CHECKS,
    ) -> None:
        self.cpu = cpus[slot % len(cpus)]
        self.allowed = set(cpus)
        self.check = check
        self.backoff = backoff

    def pin(self) -> None:
        set_all_threads({self.cpu})

    def watch(self, stop: threading.Event) -> threading.Thread:
        """Pin now, then let go of the CPU while it is crowded (see the module's text)."""
        self.pin()
        thread = threading.Thread(
            target=self._watch, args=(stop,), name="cpu-affinity", daemon=True
        )
        thread.start()
        return thread

    def _watch(self, stop: threading.Event) -> None:
        try:
            self._watch_until(stop)
        except OSError as exc:  # e.g. the CPU was taken out of the process's cpuset
            log.warning(
                "cannot keep to CPU %d (%s): the kernel places this process from now on",
                self.cpu,
                exc,
            )
            with contextlib.suppress(OSError):
                set_all_threads(self.allowed)

    def _watch_until(self, stop: threading.Event) -> None:
        before = Sample.take(self.cpu)
        while not stop.wait(self.check):
            after = Sample.take(self.cpu)
            own, others = shares(before, after)
            if others > CROWDED and own > BUSY:
                log.info(
                    "CPU %d is busy with other work (%.0f%% of it): "
                    "serving from any of CPUs %s for %.0f s",
                    self.cpu,
                    100 * others,
                    sorted(self.allowed),
                    self.check * self.backoff,
                )
                set_all_threads(self.allowed)
                if stop.wait(self.check * self.backoff):
                    return
                self.pin()
                log.info("serving from CPU %d again", self.cpu)
                after = Sample.take(self.cpu)
            before = after


def allowed_cpus(mode: str, workers: int) -> list[int] | None:
    """The CPUs `workers` serving processes keep to under `mode`; None: no pinning.

    Only when each process can have a CPU of its own: with more processes than CPUs,
    two would share one and count each other as other work.
    """
    if mode not in MODES:
        raise ValueError(f"unknown CPU affinity mode {mode!r}: use one of {', '.join(MODES)}")
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if mode == "auto" and len(cpus) > 1 and workers <= len(cpus) else None

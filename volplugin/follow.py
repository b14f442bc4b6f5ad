"""Following a plugin job from the command line until it ends, showing its progress.

The job is read with long polls of /Jobs.Get. When stderr is a terminal a rich progress
bar shows files, bytes, rate and ETA (when the plugin knows the totals); otherwise a
plain line goes to stderr every PLAIN_EVERY seconds, and one when the job ends. Ctrl-C
stops following only: the job goes on in the plugin, and the message says how to
follow it again or cancel it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import click

from layerfs.clitools import human_bytes
from volplugin.client import PluginClient
from volplugin.errors import VolpluginError
from volplugin.jobtext import command, duration, ended, failure, progress_text, what
from volplugin.text import printable

BAR_POLL = 1  # seconds a long poll waits while a progress bar shows
PLAIN_EVERY = 5  # seconds between plain progress lines (each one long poll)
MIN_POLL_GAP = 0.1  # seconds between polls at least, whatever the plugin answers
POLL_SLACK = 30.0  # seconds a long poll may take beyond its Wait


class JobFailed(VolpluginError):
    """A followed job ended without success (failed, cancelled, interrupted)."""


class StoppedFollowing(click.exceptions.Exit):
    """Ctrl-C while following: the job goes on; exit status 130 like an interrupt."""

    def __init__(self) -> None:
        super().__init__(130)


def get(client: PluginClient, job_id: str, wait: float = 0) -> dict:
    """The job `job_id`, once it has ended or after `wait` seconds (a long poll)."""
    return client.call("Jobs.Get", {"ID": job_id, "Wait": wait}, timeout=wait + POLL_SLACK)["Job"]


@dataclass
class _Rate:
    """Bytes (or files) per second since following began, and the ETA it gives."""

    start: float = field(default_factory=time.monotonic)
    first: tuple[int, int] | None = None  # (files, bytes) at the first look

    def measure(self, job: dict) -> tuple[float | None, float | None]:
        """(bytes per second, seconds left) as far as known."""
        progress = job.get("Progress") or {}
        files, size = progress.get("Files") or 0, progress.get("Bytes") or 0
        if self.first is None or job.get("State") != "running":
            if job.get("State") == "running":
                self.first, self.start = (files, size), time.monotonic()
            return None, None
        elapsed = time.monotonic() - self.start
        if elapsed <= 0:
            return None, None
        byte_rate = (size - self.first[1]) / elapsed
        file_rate = (files - self.first[0]) / elapsed
        total_size, total_files = progress.get("TotalBytes"), progress.get("TotalFiles")
        eta = None
        if total_size is not None and byte_rate > 0:
            eta = max(total_size - size, 0) / byte_rate
        elif total_files is not None and file_rate > 0:
            eta = max(total_files - files, 0) / file_rate
        return byte_rate, eta


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def plain_line(job: dict, rate: float | None = None, eta: float | None = None) -> str:
    """`backup of d1 (j-...): running, 120/500 files, 3.4 MiB/10 MiB, 1.2 MiB/s, ETA 0:06`."""
    line = f"{what(job)} ({printable(job.get('ID'))}): {printable(job.get('State'))}"
    if ended(job):
        took = duration(job)
        if took is not None:
            line += f" in {took:.1f} s"
    parts = [progress_text(job)]
    if rate is not None and not ended(job):
        parts.append(f"{human_bytes(rate)}/s")
    if eta is not None and not ended(job):
        parts.append(f"ETA {_clock(eta)}")
    return ", ".join([line, *(p for p in parts if p)])


def follow(client: PluginClient, job: dict) -> dict:
    """Follow `job` until it ends, showing its progress; the ended job.

    Ctrl-C raises StoppedFollowing after saying how to follow or cancel the job.
    """
    follower = _Follower(client, job)
    try:
        if sys.stderr.isatty():
            follower.with_bar()
        else:
            follower.with_lines()
    except KeyboardInterrupt:
        job = follower.job
        again = f"{command(client)} job {printable(job.get('ID'))}"
        click.echo(
            f"\nstopped following; the {what(job)} job {printable(job.get('ID'))} goes on in "
            f"the plugin: `{again} --wait` follows it again, `{again} --cancel` cancels it",
            err=True,
        )
        raise StoppedFollowing() from None
    return follower.job


def succeeded(job: dict) -> dict:
    """`job` if it succeeded, else JobFailed saying how it ended."""
    message = failure(job)
    if message is not None:
        raise JobFailed(message)
    return job


@dataclass
class _Follower:
    """The job as last seen, polled until it ends."""

    client: PluginClient
    job: dict

    def _poll(self, wait: float) -> None:
        asked = time.monotonic()
        self.job = get(self.client, self.job["ID"], wait)
        gap = MIN_POLL_GAP - (time.monotonic() - asked)
        if gap > 0 and not ended(self.job):
            time.sleep(gap)

    def with_lines(self) -> None:
        rate = _Rate()
        rate.measure(self.job)
        while not ended(self.job):
            self._poll(PLAIN_EVERY)
            if not ended(self.job):
                click.echo(plain_line(self.job, *rate.measure(self.job)), err=True)
        click.echo(plain_line(self.job), err=True)

    def with_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Speed(ProgressColumn):
            """Bytes per second in binary units, like the sizes next to it."""

            def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
                speed = task.finished_speed or task.speed
                shown = "?" if speed is None else f"{human_bytes(speed)}/s"
                return Text(shown, style="progress.data.speed")

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[files]}"),
            DownloadColumn(binary_units=True),
            Speed(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(**self._bar_fields())
            while not ended(self.job):
                self._poll(BAR_POLL)
                bar.update(task, **self._bar_fields())

    def _bar_fields(self) -> dict:
        """The progress bar's task fields for the job as last seen."""
        progress = self.job.get("Progress") or {}
        files, total_files = progress.get("Files") or 0, progress.get("TotalFiles")
        size, total = progress.get("Bytes") or 0, progress.get("TotalBytes")
        if total is None and ended(self.job):
            total = size  # a full bar, not a pulsing one, once it is over
        return {
            "description": f"{what(self.job)}: {printable(self.job.get('State'))}",
            "completed": size,
            "total": total,
            "files": f"{files}/{total_files} files"
            if total_files is not None
            else f"{files} files",
        }

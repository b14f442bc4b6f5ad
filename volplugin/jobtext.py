"""How the plugin's jobs (JOB documents of /Jobs.Get) read on a terminal.

A job is what it does (`backup of d1`), its state, and its progress (`120/500 files,
3.4 MiB/10.0 MiB`); texts that came from the plugin pass through `printable`.
"""

from __future__ import annotations

from layerfs.clitools import human_bytes
from volplugin.client import PluginClient
from volplugin.defaults import DEFAULT_NAME, PLUGIN_DIR
from volplugin.text import printable
from volplugin.times import parse_time

ENDED = frozenset({"succeeded", "failed", "cancelled", "interrupted"})


def what(job: dict) -> str:
    """`backup of d1`, `restore into d1`, `prune`, `prune of d1`."""
    kind, volume = printable(job.get("Kind") or "job"), job.get("Volume")
    if not volume:
        return kind
    return f"{kind} {'into' if kind == 'restore' else 'of'} {printable(volume)}"


def ended(job: dict) -> bool:
    return job.get("State") in ENDED


def progress_text(job: dict) -> str:
    """`120/500 files, 3.4 MiB/10.0 MiB` (totals only where known); '' before any."""
    progress = job.get("Progress") or {}
    files, total_files = progress.get("Files") or 0, progress.get("TotalFiles")
    size, total_size = progress.get("Bytes") or 0, progress.get("TotalBytes")
    if not (files or size or total_files or total_size):
        return ""
    files_text = f"{files}/{total_files} files" if total_files is not None else f"{files} files"
    size_text = human_bytes(size)
    if total_size is not None:
        size_text += f"/{human_bytes(total_size)}"
    return f"{files_text}, {size_text}"


def duration(job: dict) -> float | None:
    """Seconds from Started to Finished, None unless both are known."""
    start, end = parse_time(job.get("Started")), parse_time(job.get("Finished"))
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def summary(job: dict) -> str:
    """One line: `j-... backup of d1: running, 120/500 files, 3.4 MiB`."""
    line = f"{printable(job.get('ID'))} {what(job)}: {printable(job.get('State'))}"
    progress = progress_text(job)
    if progress:
        line += f", {progress}"
    if job.get("Error"):
        line += f": {printable(job['Error'])}"
    return line


def command(client: PluginClient) -> str:
    """`volplugin` with the options that reach `client`'s plugin (beyond the defaults)."""
    words = ["volplugin"]
    if client.name != DEFAULT_NAME:
        words += ["--name", client.name]
    if str(client.plugin_dir) != str(PLUGIN_DIR):
        words += ["--plugin-dir", str(client.plugin_dir)]
    return " ".join(words)


def failure(job: dict) -> str | None:
    """The one-line error of a job that ended without success; None if it succeeded."""
    state, head = job.get("State"), f"{what(job)} job {printable(job.get('ID'))}"
    error = printable(job["Error"]) if job.get("Error") else None
    if state == "succeeded":
        return None
    if state == "cancelled":
        return f"{head} was cancelled" + (f": {error}" if error else "")
    if state == "interrupted":
        return f"{head} was interrupted (the plugin stopped while it ran): run it again"
    return f"{head} {printable(state)}" + (f": {error}" if error else "")

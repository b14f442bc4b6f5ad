"""Default names, paths and sizes of `volplugin serve`, importable without its libraries.

The command line reads these for its options and --help; importing volplugin.server
(flask, waitress, the docker SDK) only happens when a command needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

PLUGIN_DIR = Path("/run/docker/plugins")
DEFAULT_NAME = "volplugin"
DEFAULT_ROOT = Path("/var/lib/volplugin")
DEFAULT_THREADS = 2  # waitress threads per serving process (why: default_workers)
DEFAULT_TICK = 5.0  # seconds between the scheduler's looks for due backups


def default_workers() -> int:
    """One process per core, at most 4, of DEFAULT_THREADS threads each.

    Under load, more processes than cores add switches between them, and more threads
    add switches of Python's interpreter lock, which goes from thread to thread in no
    fair order: both widen the spread of answer times (bench_volplugin.py --layouts
    measures other layouts beside this one; see benchmarks/RESULTS.md).
    """
    return max(1, min(os.cpu_count() or 1, 4))

"""Default names, paths and sizes of `volplugin serve`, importable without its libraries.

The command line reads these for its options and --help; importing volplugin.server
(flask, waitress, the docker SDK) only happens when a command needs it.
"""

from __future__ import annotations

from pathlib import Path

PLUGIN_DIR = Path("/run/docker/plugins")
DEFAULT_NAME = "volplugin"
DEFAULT_ROOT = Path("/var/lib/volplugin")
DEFAULT_THREADS = 8  # waitress threads: requests answered at once (a Mount may wait)
DEFAULT_TICK = 5.0  # seconds between the scheduler's looks for due backups


def plugin_socket(name: str, plugin_dir: Path = PLUGIN_DIR) -> Path:
    """PLUGIN_DIR/NAME.sock, the socket of the plugin NAME (a valid volume-style name)."""
    from volplugin.volumes.names import check_name

    return Path(plugin_dir) / f"{check_name(name)}.sock"

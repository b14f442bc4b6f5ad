"""`volplugin` and `layerfs` start without their heavy libraries (checked with -X importtime).

--help, and the socket calls of `volplugin` (ls, inspect, backups, jobs, a backup job
followed with plain progress lines, ls --all-hosts, release) against a fake plugin,
import no web framework, docker SDK, boto3, rich, store, crypto or volume-service
module: the modules a start imports are checked, not its time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fakejobs import FakePlugin

HEAVY = {"docker", "boto3", "botocore", "flask", "waitress", "fuse"}
# what a call through the plugin's socket needs none of
SOCKET_CALL_AVOIDS = HEAVY | {
    "werkzeug",
    "rich",
    "tqdm",
    "prometheus_client",
    "cryptography",
    "argon2",
    "zstandard",
    "xxhash",
    "blake3",
    "pyfastcdc",
    "croniter",
    "sqlite3",
}
AVOIDED_MODULES = (
    "layerfs.store.chunks",
    "layerfs.store.location",
    "layerfs.repo",
    "layerfs.maintenance",
    "volplugin.backup.service",
    "volplugin.backup.runner",
    "volplugin.volumes.service",
    "volplugin.volumes.state",
    "volplugin.server",
)


def imported(args: list[str], env: dict[str, str] | None = None) -> set[str]:
    """Full names of the modules `python -X importtime ARGS` imported (it must succeed)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "volplugin.cli", "--help"],
        ["-m", "volplugin.cli", "backup", "--help"],
        ["-m", "volplugin.cli", "serve", "--help"],
        ["-m", "layerfs.cli", "--help"],
        ["-m", "layerfs.cli", "mount", "--help"],
    ],
)
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    names = top_level(imported(args))
    assert "click" in names  # the list was read
    assert not names & HEAVY, f"{' '.join(args)} imported {sorted(names & HEAVY)}"


def _light(names: set[str], what: str) -> None:
    heavy = top_level(names) & SOCKET_CALL_AVOIDS
    assert not heavy, f"{what} imported {sorted(heavy)}"
    modules = sorted(n for n in names if n.startswith(AVOIDED_MODULES))
    assert not modules, f"{what} imported {modules}"


def test_help_imports_no_store_or_service_module() -> None:
    _light(imported(["-m", "volplugin.cli", "--help"]), "volplugin --help")


@pytest.mark.parametrize(
    "args",
    [
        ["ls"],
        ["ls", "--json"],
        ["inspect", "v1"],
        ["jobs"],
        ["backup", "v1"],  # a job followed to its end, plain progress lines (no terminal)
        ["restore", "abc", "--to", "v2", "--no-wait"],
        ["ls", "--all-hosts"],
        ["release", "v1", "--force", "--yes"],
    ],
)
def test_socket_calls_import_only_what_they_use(tmp_path: Path, args: list[str]) -> None:
    with FakePlugin(tmp_path / "plugins", steps=2, step_delay=0.05) as fake:
        where = ["--plugin-dir", str(fake.plugin_dir), "--name", fake.name]
        names = imported(["-m", "volplugin.cli", *where, *args])
        assert fake.requests, "the command did not reach the fake plugin"
    assert "volplugin.client" in names and "http.client" in names  # the list was read
    _light(names, f"volplugin {' '.join(args)}")

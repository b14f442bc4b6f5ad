"""`volplugin --help` and `layerfs --help` import no heavy library (checked with -X importtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = {"docker", "boto3", "botocore", "flask", "waitress", "fuse"}


def imported(args: list[str]) -> set[str]:
    """Top-level names of the modules `python -X importtime ARGS` imported."""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


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
    names = imported(args)
    assert "click" in names  # the list was read
    assert not names & HEAVY, f"{' '.join(args)} imported {sorted(names & HEAVY)}"

"""Build the pjdfstest POSIX suite from ../shared/third_party and run it in a directory.

The source tree is read-only in CI, so it is copied to a build directory first.
Results are parsed from `prove` into the set of test files that failed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2].parent / "shared" / "third_party" / "pjdfstest"
BUILD = Path("/var/tmp/layerfs-tests/pjdfstest")


@dataclass
class ProveResult:
    """What `prove -r` reported: every test file run and those that failed."""

    files: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    summary: str = ""

    @property
    def passed(self) -> set[str]:
        return set(self.files) - self.failed


def source_available() -> bool:
    return (SOURCE / "configure.ac").exists()


def build() -> Path:
    """Build pjdfstest once (autoreconf, configure, make); return the tree's path."""
    binary = BUILD / "pjdfstest"
    if binary.exists():
        return BUILD
    if BUILD.exists():
        shutil.rmtree(BUILD)
    shutil.copytree(SOURCE, BUILD)
    for cmd in (["autoreconf", "-ifs"], ["./configure"], ["make", "pjdfstest"]):
        proc = subprocess.run(cmd, cwd=BUILD, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building pjdfstest failed at {' '.join(cmd)}:\n{proc.stderr}")
    return BUILD


_LINE = re.compile(r"^(\S+\.t) \.+ ?(.*)$")


def run(directory: Path, timeout: float = 1500) -> ProveResult:
    """Run the whole suite with `prove -r` from inside ``directory``."""
    tree = build()
    proc = subprocess.run(
        ["prove", "-r", str(tree / "tests")],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, LC_ALL="C"),
    )
    return parse(proc.stdout, tree / "tests")


def parse(out: str, tests_dir: Path) -> ProveResult:
    """Parse `prove -r` output into the files run and the files that failed."""
    tree_tests = tests_dir
    result = ProveResult()
    for line in out.splitlines():
        m = _LINE.match(line)
        if m:
            name = os.path.relpath(m.group(1), tree_tests)
            result.files.append(name)
    # The summary report lists every failing file (also those whose line said "ok" first).
    report = out.split("Test Summary Report", 1)
    if len(report) == 2:
        for line in report[1].splitlines():
            m = re.match(r"^(\S+\.t)\s+\(Wstat", line)
            if m:
                name = os.path.relpath(m.group(1), tree_tests)
                tail = report[1].split(m.group(1), 1)[1].split("\n/", 1)[0]
                if "Failed test" in tail or "Non-zero" in tail or "Parse errors" in tail:
                    result.failed.add(name)
        result.summary = "Test Summary Report" + report[1]
    else:
        result.summary = "\n".join(out.splitlines()[-3:])
    return result

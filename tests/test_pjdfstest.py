"""POSIX conformance: the pjdfstest suite inside a writable layerfs mount.

Every test file that passes on fuse-overlayfs (run here, in the same session, on
the same kind of empty lower directory) must also pass on layerfs. The files
that fail on both are listed in the printed summary; see tests/PJDFSTEST.md.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import pjdfstest

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

LAYERFS = Path(sys.executable).with_name("layerfs")  # the layerfs beside this Python


@pytest.fixture(scope="module")
def suite() -> Path:
    if not pjdfstest.source_available():
        pytest.skip(f"pjdfstest source not found at {pjdfstest.SOURCE}")
    if shutil.which("prove") is None or shutil.which("autoreconf") is None:
        pytest.fail("pjdfstest needs perl's prove, autoconf and automake: run scripts/setup.sh")
    return pjdfstest.build()


def _overlay_dirs(base: Path) -> tuple[Path, Path, Path, Path]:
    dirs = [base / n for n in ("lower", "upper", "work", "mnt")]
    for d in dirs:
        d.mkdir(parents=True)
    return dirs[0], dirs[1], dirs[2], dirs[3]


def _run_in(cmd: list[str], mnt: Path) -> pjdfstest.ProveResult:
    subprocess.run(cmd, check=True)
    try:
        return pjdfstest.run(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.timeout(3000)
def test_pjdfstest_passes_where_fuse_overlayfs_passes(suite: Path, tmp_path: Path, capsys) -> None:
    lower, upper, work, fmnt = _overlay_dirs(tmp_path / "fuse-overlayfs")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    fuse_overlayfs = ["fuse-overlayfs", "-o", opts, str(fmnt)]
    lower, upper, work, lmnt = _overlay_dirs(tmp_path / "layerfs")
    layerfs = [str(LAYERFS), "mount", "--lowerdir", str(lower), "--upperdir", str(upper)]
    layerfs += ["--workdir", str(work), str(lmnt)]
    # Both suites run at once, in separate directories, to halve the wall time.
    with ThreadPoolExecutor(2) as pool:
        baseline_run = pool.submit(_run_in, fuse_overlayfs, fmnt)
        ours_run = pool.submit(_run_in, layerfs, lmnt)
        baseline, ours = baseline_run.result(), ours_run.result()
    with capsys.disabled():  # the summary belongs in the test output, pass or fail
        print("\n== pjdfstest on layerfs ==")
        print(f"files: {len(ours.files)}, failed: {len(ours.failed)}")
        print(ours.summary)
        print(f"== fuse-overlayfs: files: {len(baseline.files)}, failed: {sorted(baseline.failed)}")
    assert len(ours.files) == len(baseline.files) > 200
    regressions = sorted(baseline.passed - ours.passed)
    assert not regressions, f"pass on fuse-overlayfs but fail on layerfs: {regressions}"


@pytest.mark.timeout(3000)
def test_pjdfstest_passes_in_a_writable_image_mount_at_its_root_and_deeper(
    suite: Path, tmp_path: Path, capsys
) -> None:
    """An image mount is kernel overlayfs over the image view: no file of the suite may
    fail, at the mount's root or in a subdirectory (where paths near PATH_MAX gain a
    component, which a daemon that rebuilds whole paths gets wrong)."""
    from layerfs.store.location import open_store
    from tests.support.synthetic import d, f, make_image

    store = tmp_path / "store"
    s = open_store(str(store))
    make_image(s, "pjd/base:1", [[d(""), d("etc"), f(s, "etc/hello", b"hello\n")]])
    mounts = []
    for name in ("root", "deep"):
        mnt = tmp_path / name / "mnt"
        mnt.mkdir(parents=True)
        cmd = [str(LAYERFS), "--store", str(store), "mount", "pjd/base:1", str(mnt)]
        subprocess.run([*cmd, "--upper", str(tmp_path / name / "changes")], check=True)
        mounts.append(mnt)
    root, deep = mounts
    (deep / "a" / "deeper").mkdir(parents=True)
    try:
        with ThreadPoolExecutor(2) as pool:
            at_root = pool.submit(pjdfstest.run, root)
            below = pool.submit(pjdfstest.run, deep / "a" / "deeper")
            results = {"at the root": at_root.result(), "in a subdirectory": below.result()}
    finally:
        for mnt in mounts:
            subprocess.run([str(LAYERFS), "umount", str(mnt)], check=False)
    with capsys.disabled():
        for where, result in results.items():
            print(f"\n== pjdfstest in a writable image mount, {where} ==")
            print(f"files: {len(result.files)}, failed: {sorted(result.failed)}")
    for where, result in results.items():
        assert len(result.files) > 200, where
        assert not result.failed, f"{where}: {result.summary}"

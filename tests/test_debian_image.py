"""A real distribution through an image mount: Debian's own package checks pass on it.

`dpkg --verify` compares every installed file with the checksums its package
shipped, so it notices a wrong byte, a lost file or a wrong type anywhere in
the tree. Through the real `layerfs` CLI (import from the Docker daemon, mount
as a kernel overlay over the image's view), beside `docker run` of the same image.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.debian import ensure_debian_image
from tests.support.lfsmount import layerfs, mounted, public_dir

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def debian(tmp_path_factory) -> tuple[Path, str]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    tag = ensure_debian_image()
    store = tmp_path_factory.mktemp("debian-store")
    layerfs(store, "import", "--from-docker", tag)
    return store, tag


def _chroot(root: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )


def test_dpkg_verify_finds_nothing_wrong_in_a_mounted_debian(debian):
    store, tag = debian
    with public_dir("debian-") as base, mounted(store, tag, base / "m") as m:
        verify = _chroot(m, "dpkg --verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stdout == "" and verify.stderr == ""
        audit = _chroot(m, "dpkg --audit")
        assert audit.returncode == 0 and audit.stdout == "", audit.stdout + audit.stderr
        packages = _chroot(m, "dpkg-query -W -f '${Package} ${Version}\\n' | sort")
        in_docker = subprocess.run(
            [
                "docker",
                "run",
                "--rm",
                tag,
                "/bin/sh",
                "-c",
                "dpkg-query -W -f '${Package} ${Version}\\n' | sort",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert packages.stdout == in_docker.stdout and packages.stdout.count("\n") > 50


def test_a_writable_debian_mount_runs_dpkg_and_keeps_its_changes(debian):
    store, tag = debian
    with public_dir("debian-") as base:
        upper, m = base / "changes", base / "m"
        m.mkdir()
        layerfs(store, "mount", tag, str(m), "--upper", str(upper))
        try:
            # dpkg rewrites its database in place: copy-ups of metacopy files, renames
            changed = _chroot(
                m, "dpkg-divert --local --rename --add /usr/bin/tr && ls /usr/bin/tr.distrib"
            )
            assert changed.returncode == 0, changed.stdout + changed.stderr
            assert _chroot(m, "dpkg --verify").stdout.strip() == ""
        finally:
            layerfs(store, "umount", str(m))
        tree = upper / "upper"
        assert (tree / "usr/bin/tr.distrib").is_file()
        gone = os.lstat(tree / "usr/bin/tr")  # the kernel's whiteout: a 0/0 char device
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0

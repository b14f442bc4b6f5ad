"""A real distribution in containers on the layerfs snapshotter: Debian's own checks pass.

The Debian minbase test image (tests.support.debian), saved by Docker and
imported with `ctr image import --snapshotter layerfs` into a private
containerd; `dpkg --verify` in a `ctr run --snapshotter layerfs` container
checks every installed file against its package's checksums, and the same
image under containerd's overlayfs snapshotter lists the same packages.
"""

from __future__ import annotations

import pytest

from tests.support.containerd import private_containerd
from tests.support.debian import DEBIAN_IMAGE, ensure_debian_image
from tests.support.images import docker_save

pytestmark = [pytest.mark.docker, pytest.mark.fuse]

REF = f"docker.io/{DEBIAN_IMAGE}"
PACKAGES = "dpkg-query -W -f '${Package} ${Version} ${db:Status-Status}\\n' | sort"


def test_dpkg_verify_in_a_container_on_the_layerfs_snapshotter(docker_client, tmp_path):
    ensure_debian_image()
    archive = docker_save(DEBIAN_IMAGE, tmp_path / "debian.tar")
    with private_containerd() as ctd:
        ctd.ctr("image", "import", "--snapshotter", "layerfs", str(archive), timeout=900)
        verify = ctd.ctr(
            "run", "--rm", "--snapshotter", "layerfs", REF, "verify", "sh", "-c",
            "dpkg --verify; echo status=$?; dpkg --audit; echo audit=$?",
        )  # fmt: skip
        assert verify.stdout == "status=0\naudit=0\n", verify.stdout
        assert verify.stderr == ""
        ours = ctd.ctr("run", "--rm", "--snapshotter", "layerfs", REF, "pkgs", "sh", "-c", PACKAGES)
        ctd.ctr("image", "import", "--snapshotter", "overlayfs", str(archive), timeout=900)
        theirs = ctd.ctr(
            "run", "--rm", "--snapshotter", "overlayfs", REF, "pkgs-ovl", "sh", "-c", PACKAGES
        )
        assert ours.stdout == theirs.stdout
        assert ours.stdout.count(" installed\n") > 50
        assert "dpkg " in ours.stdout and "libc6 " in ours.stdout

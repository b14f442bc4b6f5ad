"""A mounted image shows exactly what the Docker daemon gives for a container of it.

The feature image (tests/support/images.py) is imported twice, from `docker
save` and from a skopeo OCI archive; each import is mounted and compared, path
by path, with `docker export` of a container created from the same image.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layerfs.importer import import_archive
from layerfs.store.location import open_store
from tests.support import images
from tests.support.lfsmount import mounted, public_dir
from tests.support.treesnap import Snapshot, differences, snapshot

pytestmark = [pytest.mark.docker, pytest.mark.fuse]

TAG = "lfsmnt/feature:compare"

# `docker create` puts an init layer between the image and the container's
# writable layer (daemon/initlayer): it adds these paths, so they are not the
# image's and are left out of the comparison ...
DAEMON_ADDED = {
    ".dockerenv",
    "etc/hosts",
    "etc/hostname",
    "etc/resolv.conf",
    "etc/mtab",
    "dev/console",
    "dev/pts",
    "dev/shm",
    "proc",
    "sys",
}
# ... and it makes their parent directories in that layer (MkdirAll 0755, with
# the time of `docker create`), which then merge over the image's directories
# and take the init layer's attributes. The root's attributes are not compared
# either: `docker export` writes no entry for it, so the extracted root shows
# the extraction directory's. Children of these directories are still compared.
DAEMON_DIR_ATTRS = {"", "etc", "dev"}


def _without_daemon_additions(snap: Snapshot) -> Snapshot:
    items = {p: i for p, i in snap.items.items() if p not in DAEMON_ADDED}
    for path in DAEMON_DIR_ATTRS:
        items.pop(path, None)
    return Snapshot(items, snap.links)


@pytest.fixture(scope="module")
def feature_image(docker_client):
    images.build_feature_image(docker_client, TAG)
    yield TAG
    images.remove_images(docker_client, [TAG])


@pytest.fixture(scope="module")
def daemon_tree(docker_client, feature_image, tmp_path_factory) -> Snapshot:
    """What the daemon gives: `docker export` of a created container, extracted as root."""
    root = tmp_path_factory.mktemp("lfsmnt-export")
    container = docker_client.containers.create(feature_image, name=None)
    try:
        export = subprocess.Popen(["docker", "export", container.id], stdout=subprocess.PIPE)
        subprocess.run(
            [
                "tar", "-x", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p",
                "-C", str(root),
            ],
            stdin=export.stdout,
            check=True,
        )  # fmt: skip
        assert export.wait() == 0
    finally:
        container.remove(force=True)
    return _without_daemon_additions(snapshot(root))


@pytest.fixture(scope="module")
def archives(feature_image, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("lfsmnt-archives")
    saved = images.docker_save(feature_image, work / "saved.tar")
    oci = work / "oci.tar"
    images.skopeo_copy(f"docker-archive:{saved}", f"oci-archive:{oci}:compare")
    return {"docker-save": saved, "oci-archive": oci}


@pytest.mark.parametrize("source", ["docker-save", "oci-archive"])
def test_mount_matches_docker_export(source, archives, daemon_tree, tmp_path):
    store = open_store(str(tmp_path / "store"))
    name = f"lfsmnt/feature:{source}"
    import_archive(store, archives[source], tag=name)
    with public_dir() as base, mounted(tmp_path / "store", name, base / "m") as m:
        mine = _without_daemon_additions(snapshot(m))
    assert len(mine.items) > 300  # the busybox base and every feature path
    # The comparison covers the features that matter (not two empty trees).
    cap = daemon_tree.items[images.FEATURE_XATTR_FILE]
    assert cap.xattrs == (("security.capability", images.FEATURE_CAPABILITY),)
    assert daemon_tree.items["feat/dev/block"].rdev == (7, 0)
    assert daemon_tree.items["feat/modes/setuid"].mode == 0o4755
    assert frozenset({"feat/hl/orig", "feat/hl/upper"}) in daemon_tree.links
    assert "feat/opq/x" not in daemon_tree.items and "feat/del/a" not in daemon_tree.items
    assert "feat/xa/" + os.fsdecode(images.FEATURE_NON_UTF8_NAME) in daemon_tree.items
    diff = differences(daemon_tree, mine)
    assert not diff, "\n".join(diff)

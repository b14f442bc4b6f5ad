"""The layerfs snapshotter under a real (private) containerd, with runc containers.

Images are the busybox-based test images, as `docker save` archives (legacy)
and OCI archives (skopeo), imported with `ctr image import --snapshotter
layerfs`; containerd's own overlayfs snapshotter is the reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from layerfs.fs.mounting import kernel_mounts
from layerfs.imageconfig import chain_ids
from layerfs.snapshotter.metadata import Kind, Metadata
from tests.support.containerd import (
    LISTING,
    NAMESPACE,
    content_blobs,
    private_containerd,
    run_script,
    snapshot_rows,
    tail,
)
from tests.support.images import FEATURE_IMAGE, build_feature_image, docker_save, skopeo_copy
from tests.support.lfsmount import layerfs
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.fuse]

REF = f"docker.io/{FEATURE_IMAGE}"
OCI_REF = "docker.io/lfsimp/feature-oci:latest"


@pytest.fixture(scope="module")
def archives(docker_client, busybox_image, tmp_path_factory) -> dict[str, Path]:
    build_feature_image(docker_client)
    out = tmp_path_factory.mktemp("ctd-archives")
    legacy = docker_save(FEATURE_IMAGE, out / "feature-docker.tar")
    oci = out / "feature-oci.tar"
    skopeo_copy(f"docker-daemon:{FEATURE_IMAGE}", f"oci-archive:{oci}:{OCI_REF}")
    return {"legacy": legacy, "oci": oci}


@pytest.fixture(scope="module")
def ctd(archives):
    with private_containerd() as c:
        c.ctr("image", "import", "--snapshotter", "layerfs", str(archives["legacy"]))
        yield c


def test_import_stores_layers_and_runs_like_overlayfs(ctd, archives, docker_client):
    layers = snapshot_rows(ctd)
    assert len(layers) == 4  # busybox, two RUN layers, an ADD layer
    assert all(row[-1] == "Committed" for row in layers)
    # the committed layers are in the layerfs store, pinned, their uppers gone
    root = ctd.snapshotter.root / "snapshots"
    # committed snapshots keep no upper directory (removed once the Commit is answered)
    wait_for(lambda: not list(root.glob("*/fs")), "the committed snapshots' uppers to go")
    pins = list((ctd.snapshotter.store / "docs" / "pins").iterdir())
    assert len(pins) == 4
    # each is recorded under its chain ID (those of the image's DiffIDs), and no layer
    # tar was regenerated for it: only the bottom layer's DiffID (its chain ID) is known
    meta = Metadata(ctd.snapshotter.root / "metadata.db")
    committed = [s for s in meta.all() if s.kind is Kind.COMMITTED]
    meta.close()
    diff_ids = docker_client.images.get(FEATURE_IMAGE).attrs["RootFS"]["Layers"]
    assert sorted(s.chain_id for s in committed) == sorted(chain_ids(diff_ids))
    assert all(s.key.endswith("/" + s.chain_id) for s in committed)
    assert sorted(s.layer.diff_id for s in committed) == ["", "", "", diff_ids[0]]
    # every committed chain is mounted after its commit, before any container asks
    wait_for(
        lambda: len([m for m in kernel_mounts() if m.mountpoint.startswith(f"{root}/")]) == 4,
        "the committed chains' ro mounts",
    )
    assert {Path(m.mountpoint).name for m in kernel_mounts() if str(root) in m.mountpoint} == {"ro"}

    ours = run_script(ctd, "layerfs", REF, "list-layerfs", LISTING)
    links = run_script(ctd, "layerfs", REF, "links", "stat -c '%i %h' /feat/hl/orig /feat/hl/upper")
    first, second = links.splitlines()
    assert first == second and first.endswith(" 2")
    ctd.ctr("image", "import", "--snapshotter", "overlayfs", str(archives["legacy"]))
    reference = run_script(ctd, "overlayfs", REF, "list-overlayfs", LISTING)
    assert ours.endswith("end-of-listing\n") and "feat/hl/orig" in ours
    assert ours == reference
    docker_out = docker_client.containers.run(
        FEATURE_IMAGE, ["sh", "-c", LISTING], remove=True
    ).decode(errors="replace")
    # Docker's log driver replaces a name's bytes that are not UTF-8 (U+FFFD)
    assert ours.encode(errors="surrogateescape").decode(errors="replace") == docker_out


def test_oci_archive_imports_and_runs(ctd, archives):
    ctd.ctr("image", "import", "--snapshotter", "layerfs", str(archives["oci"]))
    out = run_script(ctd, "layerfs", OCI_REF, "oci-run", "cat /feat/hl/link1; ls /feat/opq")
    assert out == "hello-hardlink\nz\n"
    assert len(snapshot_rows(ctd)) == 4  # the same layers: nothing unpacked twice


def test_container_writes_into_its_upper_and_commits(ctd):
    name = "writer"
    ctd.ctr(
        "run", "--snapshotter", "layerfs", REF, name, "sh", "-c",
        "echo written > /feat/new; rm /feat/del/b; chmod 600 /feat/data/big; "
        "mkdir -p /feat/made/deep; echo d > /feat/made/deep/f; cat /feat/new",
    )  # fmt: skip
    info = json.loads(ctd.ctr("containers", "info", name).stdout)
    key = info["SnapshotKey"]
    usage = ctd.ctr("snapshots", "--snapshotter", "layerfs", "usage", key).stdout
    assert key in usage
    ctd.ctr("snapshots", "--snapshotter", "layerfs", "commit", "writer-commit", key)
    ctd.ctr("containers", "rm", name)
    view = ctd.ctr(
        "snapshots", "--snapshotter", "layerfs", "view", "--mounts", "writer-view", "writer-commit"
    ).stdout
    mounts = json.loads(view)
    assert mounts[0]["Type"] == "bind" and "ro" in mounts[0]["Options"]
    tree = Path(mounts[0]["Source"])
    assert (tree / "feat/new").read_text() == "written\n"
    assert (tree / "feat/made/deep/f").read_text() == "d\n"
    assert not (tree / "feat/del/b").exists() and (tree / "feat/del/keep").exists()
    assert (tree / "feat/data/big").stat().st_mode & 0o777 == 0o600
    assert (tree / "feat/data/big").stat().st_size == 1536 * 1024
    tree_text = ctd.ctr("snapshots", "--snapshotter", "layerfs", "tree").stdout
    assert "writer-commit" in tree_text and "writer-view" in tree_text
    ctd.ctr("snapshots", "--snapshotter", "layerfs", "rm", "writer-view")
    ctd.ctr("snapshots", "--snapshotter", "layerfs", "rm", "writer-commit")
    assert "writer-commit" not in ctd.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout


def test_snapshotter_killed_while_a_container_runs(ctd):
    before = snapshot_rows(ctd)
    ctd.ctr(
        "run", "-d", "--snapshotter", "layerfs", REF, "survivor", "sh", "-c",
        "while true; do cat /bin/busybox /feat/data/big >/dev/null && echo x >> /tmp/f; "
        "sleep 0.2; done",
    )  # fmt: skip

    def lines() -> int:
        done = ctd.ctr("task", "exec", "--exec-id", f"e{time.monotonic_ns()}", "survivor",
                       "sh", "-c", "wc -l < /tmp/f", check=False)  # fmt: skip
        return int(done.stdout.strip() or 0) if done.returncode == 0 else 0

    wait_for(lambda: lines() > 0, "the container's first write")
    ctd.snapshotter.kill()
    after_kill = lines()
    wait_for(lambda: lines() > after_kill + 3, "writes after the snapshotter was killed")
    reads = ctd.ctr("task", "exec", "--exec-id", "md5", "survivor", "md5sum", "/feat/data/big")
    assert "/feat/data/big" in reads.stdout
    status = ctd.ctr("task", "ls").stdout
    assert "survivor" in status and "RUNNING" in status

    ctd.snapshotter.start()

    # containerd redials the socket with a backoff of at most 3 s
    def listing() -> str | None:
        done = ctd.ctr("snapshots", "--snapshotter", "layerfs", "ls", check=False)
        return done.stdout if done.returncode == 0 else None

    running = wait_for(
        listing,
        "containerd to reach the restarted snapshotter",
        timeout=30,
        interval=0.5,
    )
    assert "survivor" in running
    assert [row for row in snapshot_rows(ctd) if row[0] != "survivor"] == before
    out = run_script(ctd, "layerfs", REF, "second", "cat /feat/hl/orig")
    assert out == "hello-hardlink\n", tail(ctd.snapshotter.log)
    ctd.ctr("task", "kill", "-s", "SIGKILL", "survivor")
    wait_for(
        lambda: ctd.ctr("task", "rm", "survivor", check=False).returncode == 0,
        "the killed task to go",
        timeout=30,
    )
    ctd.ctr("containers", "rm", "survivor")
    assert "survivor" not in ctd.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout


def test_an_image_of_the_store_runs_without_its_layers_reaching_containerd(archives, docker_client):
    """`layerfs import --from-docker`, then `layerfs containerd import`: containerd gets
    the manifest and the config only, and runs the image on the store's layers."""
    with private_containerd() as ctd:
        store = ctd.snapshotter.store
        layerfs(store, "import", "--from-docker", FEATURE_IMAGE)
        # a store that lacks the image's layers: refused, nothing left in containerd
        other = ctd.base / "other-store"
        layerfs(other, "import", "--from-docker", FEATURE_IMAGE)
        args = ["--address", str(ctd.address), "--namespace", NAMESPACE]
        refused = layerfs(store, "containerd", "import", "lfsimp/small", *args, check=False)
        assert refused.returncode == 1 and "no image named" in refused.stderr
        layerfs(other, "rmi", FEATURE_IMAGE)
        layerfs(store, "rmi", FEATURE_IMAGE)  # the snapshotter's store lacks it now
        layerfs(other, "import", "--from-docker", FEATURE_IMAGE)
        missing = layerfs(other, "containerd", "import", FEATURE_IMAGE, *args, check=False)
        assert missing.returncode == 1, missing.stdout
        assert "does not hold layer 1 of lfsimp/feature:latest" in missing.stderr
        assert REF not in ctd.ctr("images", "ls", "-q").stdout
        assert snapshot_rows(ctd) == []
        assert ctd.ctr("content", "ls", "-q").stdout.split() == []

        layerfs(store, "import", "--from-docker", FEATURE_IMAGE)
        done = layerfs(store, "containerd", "import", FEATURE_IMAGE, *args)
        assert done.stdout.startswith(f"{REF} (sha256:")
        diff_ids = docker_client.images.get(FEATURE_IMAGE).attrs["RootFS"]["Layers"]
        layers = snapshot_rows(ctd)
        assert sorted(row[0] for row in layers) == sorted(chain_ids(diff_ids))
        assert all(row[-1] == "Committed" for row in layers)
        # containerd's content store: the manifest and the config, no layer
        blobs = content_blobs(ctd, 2)
        config = docker_client.images.get(FEATURE_IMAGE).id
        assert len(blobs) == 2 and config in blobs
        assert not set(blobs) & set(diff_ids)
        labels = ctd.ctr("content", "ls").stdout
        assert f"containerd.io/gc.ref.snapshot.layerfs={chain_ids(diff_ids)[-1]}" in labels

        ours = run_script(ctd, "layerfs", REF, "from-store", LISTING)
        docker_out = docker_client.containers.run(
            FEATURE_IMAGE, ["sh", "-c", LISTING], remove=True
        ).decode(errors="replace")
        assert ours.encode(errors="surrogateescape").decode(errors="replace") == docker_out
        # registering again changes nothing; containerd's gc keeps what the image uses
        layerfs(store, "containerd", "import", FEATURE_IMAGE, *args)
        assert snapshot_rows(ctd) == layers
        ctd.ctr("images", "rm", "--sync", REF)
        wait_for(lambda: snapshot_rows(ctd) == [], "containerd's gc to remove the snapshots")
        assert not list((store / "docs" / "pins").iterdir())
        assert "lfsimp/feature" in layerfs(store, "images").stdout  # the store keeps its image


WRITES = (
    "echo written > /feat/new; rm /feat/del/b; chmod 600 /feat/data/big; "
    "mkdir -p /feat/made/deep; echo d > /feat/made/deep/f; ln -s new /feat/made/link; "
    "echo appended >> /feat/hl/orig; rm -r /feat/made/deep && mkdir /feat/made/deep"
)


def _committed_listing(ctd, snapshotter: str, where: Path) -> str:
    """Run WRITES in a container on `snapshotter`, commit its snapshot, and list the
    committed tree (mounted as containerd's view of it says) from the host."""
    import subprocess

    name = f"committer-{snapshotter}"
    ctd.ctr("run", "--snapshotter", snapshotter, REF, name, "sh", "-c", WRITES)
    key = json.loads(ctd.ctr("containers", "info", name).stdout)["SnapshotKey"]
    snaps = ("snapshots", "--snapshotter", snapshotter)
    # ctr makes the commit and the view outside any lease: labelled gc roots, and no
    # deletion (which starts containerd's gc) until they are listed and removed
    root = "containerd.io/gc.root=test"
    ctd.ctr(*snaps, "commit", f"{name}-commit", key)
    ctd.ctr(*snaps, "label", f"{name}-commit", root)
    (mount,) = json.loads(
        ctd.ctr(*snaps, "view", "--mounts", f"{name}-view", f"{name}-commit").stdout
    )
    ctd.ctr(*snaps, "label", f"{name}-view", root)
    target = where / snapshotter
    target.mkdir()
    options = ",".join(mount["Options"])
    subprocess.run(
        ["mount", "-t", mount["Type"], mount["Source"], str(target), "-o", options], check=True
    )
    try:
        listed = subprocess.run(
            ["chroot", str(target), "/bin/sh", "-c", LISTING],
            capture_output=True, text=True, check=True, errors="surrogateescape",
        ).stdout  # fmt: skip
    finally:
        subprocess.run(["umount", str(target)], check=True)
        ctd.ctr(*snaps, "rm", f"{name}-view")
        ctd.ctr(*snaps, "rm", f"{name}-commit")
        ctd.ctr("containers", "rm", name)
    return listed


def test_a_committed_container_is_what_overlayfs_commits(ctd, archives, tmp_path):
    ctd.ctr("image", "import", "--snapshotter", "overlayfs", str(archives["legacy"]))
    ours = _committed_listing(ctd, "layerfs", tmp_path)
    reference = _committed_listing(ctd, "overlayfs", tmp_path)
    assert ours.endswith("end-of-listing\n") and "feat/made/link" in ours
    assert "feat/new" in ours and "feat/del/b" not in ours and "feat/made/deep/f" not in ours
    assert ours == reference

"""`ctr image pull` from a real registry through the layerfs snapshotter.

The busybox-based feature image and the Debian test image are pushed with
`docker push` to a private registry (tests.support.registry), an image whose
config names a wrong DiffID with `skopeo copy`; they are pulled by
a private containerd 1.6 (tests.support.containerd) with `--snapshotter
layerfs`; containerd's own overlayfs snapshotter pulling the same reference is
the reference. containerd 1.6's `ctr image pull` fetches every blob first and
then unpacks the image as `ctr image import` does: each layer is prepared under
``NS/N/extract-UNIQUE CHAINID`` without labels and committed as ``NS/N/CHAINID``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.imageconfig import chain_ids
from layerfs.snapshotter.chains import SNAPSHOT_REF
from layerfs.snapshotter.metadata import Kind, Metadata, Snapshot
from tests.support.containerd import (
    LISTING,
    Containerd,
    private_containerd,
    run_script,
    snapshot_rows,
)
from tests.support.debian import DEBIAN_IMAGE, ensure_debian_image
from tests.support.images import (
    FEATURE_IMAGE,
    SMALL_IMAGE,
    build_feature_image,
    build_small_image,
    oci_blob,
    oci_manifest,
    oci_put_blob,
    oci_set_manifest,
    skopeo_copy,
)
from tests.support.lfsmount import layerfs
from tests.support.registry import Registry, docker_push, private_registry
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.fuse]

BIG = 1536 * 1024  # /feat/data/big, random; the feature image's second RUN copies it


@pytest.fixture(scope="module")
def registry(docker_client, busybox_image) -> Iterator[Registry]:
    """The registry, holding the feature image as lfsimp/feature:latest."""
    build_feature_image(docker_client)
    with private_registry() as reg:
        docker_push(reg, FEATURE_IMAGE, "lfsimp/feature:latest")
        assert reg.tags("lfsimp/feature") == ["latest"]
        yield reg


@pytest.fixture(scope="module")
def ctd(registry) -> Iterator[Containerd]:
    with private_containerd() as c:
        yield c


def _recorded(ctd: Containerd) -> list[Snapshot]:
    """Every snapshot the layerfs snapshotter records (its metadata.db)."""
    meta = Metadata(ctd.snapshotter.root / "metadata.db")
    try:
        return meta.all()
    finally:
        meta.close()


def _committed(ctd: Containerd) -> dict[str, Snapshot]:
    """The snapshotter's committed snapshots by chain ID."""
    return {s.chain_id: s for s in _recorded(ctd) if s.kind is Kind.COMMITTED}


def _pull(ctd: Containerd, snapshotter: str, ref: str, timeout: float = 300) -> str:
    done = ctd.ctr(
        "image", "pull", "--plain-http", "--snapshotter", snapshotter, ref, timeout=timeout
    )
    return done.stdout


def test_pull_stores_layers_and_runs_like_overlayfs(ctd, registry, docker_client):
    ref = f"{registry.address}/lfsimp/feature:latest"
    out = _pull(ctd, "layerfs", ref)
    assert "unpacking linux/amd64 sha256:" in out and "done" in out
    assert ref in ctd.ctr("images", "ls", "-q").stdout.split()

    diff_ids = docker_client.images.get(FEATURE_IMAGE).attrs["RootFS"]["Layers"]
    chains = chain_ids(diff_ids)
    rows = snapshot_rows(ctd)
    assert sorted(row[0] for row in rows) == sorted(chains)
    assert all(row[-1] == "Committed" for row in rows)
    # every layer is in the store: recorded under its chain ID, its tree stored, pinned
    committed = _committed(ctd)
    assert sorted(committed) == sorted(chains)
    assert all(s.layer is not None and s.layer.tree and s.pin for s in committed.values())
    pins = list((ctd.snapshotter.store / "docs" / "pins").iterdir())
    assert len(pins) == len(chains)
    # content-addressed: the second RUN's copy of the random file added nothing
    first_run, second_run = committed[chains[1]].layer, committed[chains[2]].layer
    assert first_run.stored_bytes >= BIG
    assert second_run.apparent_size >= BIG and second_run.stored_bytes < 4096

    ours = run_script(ctd, "layerfs", ref, "pulled-layerfs", LISTING)
    links = run_script(
        ctd, "layerfs", ref, "pulled-links", "stat -c '%i %h' /feat/hl/orig /feat/hl/upper"
    )
    first, second = links.splitlines()
    assert first == second and first.endswith(" 2")
    _pull(ctd, "overlayfs", ref)
    assert len(snapshot_rows(ctd, "overlayfs")) == len(chains)
    reference = run_script(ctd, "overlayfs", ref, "pulled-overlayfs", LISTING)
    assert ours.endswith("end-of-listing\n") and "feat/hl/orig" in ours
    assert ours == reference


def test_pull_of_a_missing_image_or_layer_fails_and_leaves_no_snapshot(
    ctd, registry, docker_client, tmp_path
):
    before = snapshot_rows(ctd)
    images = ctd.ctr("images", "ls", "-q").stdout.split()
    missing = f"{registry.address}/lfsimp/missing:latest"
    done = ctd.ctr(
        "image", "pull", "--plain-http", "--snapshotter", "layerfs", missing, check=False
    )
    assert done.returncode == 1, done.stdout
    assert f'ctr: failed to resolve reference "{missing}": {missing}: not found' in done.stderr

    # an image whose manifest is there but whose top layer is not
    build_small_image(docker_client)
    docker_push(registry, SMALL_IMAGE, "lfsimp/broken:latest")
    top = registry.manifest("lfsimp/broken", "latest")["layers"][-1]["digest"]
    assert top not in ctd.ctr("content", "ls", "-q").stdout.split()
    registry.delete_blob("lfsimp/broken", top)
    broken = f"{registry.address}/lfsimp/broken:latest"
    done = ctd.ctr("image", "pull", "--plain-http", "--snapshotter", "layerfs", broken, check=False)
    assert done.returncode == 1, done.stdout
    assert "ctr: failed to copy:" in done.stderr and top in done.stderr, done.stderr
    assert "not found" in done.stderr
    assert ctd.ctr("images", "ls", "-q").stdout.split() == images

    # an image whose config names a DiffID its top layer does not have: containerd fetches
    # it, prepares the layer's snapshot, applies it, finds the mismatch and removes it
    wrong = "sha256:" + hashlib.sha256(b"not this layer").hexdigest()
    layout = tmp_path / "wrong-diff-id"
    skopeo_copy(f"docker-daemon:{SMALL_IMAGE}", f"oci:{layout}:latest")
    index, manifest = oci_manifest(layout)
    config = json.loads(oci_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"][-1] = wrong
    data = json.dumps(config).encode()
    manifest["config"].update(digest=oci_put_blob(layout, data), size=len(data))
    oci_set_manifest(layout, index, manifest)
    mislabelled = f"{registry.address}/lfsimp/wrong-diff-id:latest"
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:latest",
         f"docker://{mislabelled}"],
        check=True, capture_output=True,
    )  # fmt: skip
    done = ctd.ctr(
        "image", "pull", "--plain-http", "--snapshotter", "layerfs", mislabelled, check=False
    )
    assert done.returncode == 1, done.stdout
    base, actual = docker_client.images.get(SMALL_IMAGE).attrs["RootFS"]["Layers"]
    assert f'ctr: wrong diff id calculated on extraction "{actual}"' in done.stderr, done.stderr

    # nothing of the mislabelled layer is left; its busybox base layer was unpacked before
    # it (if this containerd lacked it) and stays, committed
    left = [row for row in snapshot_rows(ctd) if row not in before]
    assert all(row[0] == base and row[-1] == "Committed" for row in left), left
    # the first two left no image; the third one's image is registered (its fetch succeeded)
    assert ctd.ctr("images", "ls", "-q").stdout.split() == sorted([*images, mislabelled])

    # containerd removed the mislabelled layer's snapshot from its namespace at once; its
    # gc removes it from the snapshotter a moment later (and may remove the unreferenced
    # base layer: a Remove unpins a layer before removing its directory)
    def settled() -> bool:
        recorded = _recorded(ctd)
        dirs = {p.name for p in (ctd.snapshotter.root / "snapshots").iterdir()}
        return all(s.kind is Kind.COMMITTED for s in recorded) and dirs == {
            str(s.id) for s in recorded
        }

    wait_for(settled, "only committed snapshots and their directories to be left", timeout=30)


def _packs(store: Path) -> dict[str, int]:
    """The store's pack files: name and size."""
    return {p.name: p.stat().st_size for p in (store / "packs").rglob("*") if p.is_file()}


def test_pull_of_layers_the_store_holds(registry, docker_client):
    """containerd 1.6's pull asks nothing first (no ``containerd.io/snapshot.ref`` label):
    it fetches every layer and unpacks it, and each commit adds nothing to the store."""
    ref = f"{registry.address}/lfsimp/feature:latest"
    diff_ids = docker_client.images.get(FEATURE_IMAGE).attrs["RootFS"]["Layers"]
    chains = chain_ids(diff_ids)
    with private_containerd() as ctd:
        store = ctd.snapshotter.store
        layerfs(store, "import", "--from-docker", FEATURE_IMAGE)
        packs = _packs(store)

        _pull(ctd, "layerfs", ref)
        # every layer blob was fetched into containerd's content store
        content = ctd.ctr("content", "ls").stdout
        for diff_id in diff_ids:
            assert f"containerd.io/uncompressed={diff_id}" in content
        # and every layer was prepared without the label, applied and committed
        committed = _committed(ctd)
        assert sorted(committed) == sorted(chains)
        for snap in committed.values():
            assert SNAPSHOT_REF not in snap.labels
            assert snap.key.endswith(f"/{snap.chain_id}")
        assert "committed without unpacking" not in ctd.snapshotter.log.read_text()
        # the commits found every file's content in the store: each stored its tree only
        assert all(committed[c].layer.stored_bytes == 0 for c in chains)
        added = {name: size for name, size in _packs(store).items() if name not in packs}
        assert len(added) <= len(chains) and sum(added.values()) < 64 * 1024  # of ~2.7 MB
        assert run_script(ctd, "layerfs", ref, "held", "cat /feat/hl/link1") == "hello-hardlink\n"


def test_debian_image_pulled_through_layerfs_verifies(ctd, registry, docker_client):
    ensure_debian_image()
    ref = docker_push(registry, DEBIAN_IMAGE, "layerfs-test/debian:bookworm")
    _pull(ctd, "layerfs", ref, timeout=900)
    verify = ctd.ctr(
        "run", "--rm", "--snapshotter", "layerfs", ref, "pulled-verify", "sh", "-c",
        "dpkg --verify; echo status=$?; dpkg --audit; echo audit=$?",
    )  # fmt: skip
    assert verify.stdout == "status=0\naudit=0\n" and verify.stderr == ""
    # a directory's size depends on the filesystem below: not listed
    listing = (
        "find / -xdev \\( -type d -printf '%p %m %U:%G\\n' \\) "
        "-o -printf '%p %y %m %U:%G %s %l\\n' | sort; "
        "find / -xdev -type f -print0 | sort -z | xargs -0 md5sum"
    )
    ours = run_script(ctd, "layerfs", ref, "pulled-debian", listing)
    _pull(ctd, "overlayfs", ref, timeout=900)
    theirs = run_script(ctd, "overlayfs", ref, "pulled-debian-ovl", listing)
    assert ours.count("\n") > 2 * 6000 and "/usr/bin/dpkg f 755 0:0" in ours
    assert ours == theirs

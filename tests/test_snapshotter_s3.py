"""A second host runs an image of a shared S3 store that another host imported.

Host A imports the feature test image into an S3 store (Ceph RGW) with `layerfs
import`. Host B has its own snapshotter root, its own local cache
(LAYERFS_CACHE_DIR) and its own private containerd: `layerfs containerd
import` gives B's containerd the image without importing a layer (no pack or
index is written to the bucket, no layer blob reaches containerd), and
`ctr run --snapshotter layerfs` reads its files, fetched from the bucket.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layerfs.imageconfig import chain_ids
from tests.support.containerd import NAMESPACE, content_blobs, private_containerd
from tests.support.images import FEATURE_IMAGE, build_feature_image
from tests.support.lfsmount import LAYERFS

pytestmark = [pytest.mark.s3, pytest.mark.docker, pytest.mark.fuse]

REF = f"docker.io/{FEATURE_IMAGE}"


def _layerfs(store: str, *args: str, cache: Path | None = None) -> str:
    env = {**os.environ, **({"LAYERFS_CACHE_DIR": str(cache)} if cache else {})}
    done = subprocess.run(
        [LAYERFS, "--store", store, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, f"layerfs {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _data_keys(env, bucket: str) -> set[str]:
    """The bucket's packs and indexes (what importing content writes)."""
    pages = env.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = {o["Key"] for page in pages for o in page.get("Contents", [])}
    return {k for k in keys if k.startswith(("store/packs/", "store/index/"))}


def test_a_second_host_runs_an_image_of_the_shared_store_without_importing_it(
    s3_store_url, s3_env, docker_client, busybox_image
):
    build_feature_image(docker_client)
    bucket = s3_store_url.removeprefix("s3://").split("/")[0]
    # host A: the test's own cache (LAYERFS_CACHE_DIR of the fixture)
    _layerfs(s3_store_url, "init")
    _layerfs(s3_store_url, "import", "--from-docker", FEATURE_IMAGE)
    written_by_a = _data_keys(s3_env, bucket)
    assert written_by_a

    with private_containerd(store_url=s3_store_url) as b:
        cache_b = b.base / "cache"
        args = ["--address", str(b.address), "--namespace", NAMESPACE]
        out = _layerfs(s3_store_url, "containerd", "import", FEATURE_IMAGE, *args, cache=cache_b)
        assert out.startswith(f"{REF} (sha256:")
        diff_ids = docker_client.images.get(FEATURE_IMAGE).attrs["RootFS"]["Layers"]
        listed = b.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout
        assert all(chain in listed for chain in chain_ids(diff_ids))
        assert len(content_blobs(b, 2)) == 2  # manifest, config

        run = b.ctr(
            "run", "--rm", "--snapshotter", "layerfs", REF, "b-first", "sh", "-c",
            "cat /feat/hl/orig; md5sum /feat/data/big; ls /feat/opq",
        ).stdout  # fmt: skip
        reference = docker_client.containers.run(
            FEATURE_IMAGE,
            ["sh", "-c", "cat /feat/hl/orig; md5sum /feat/data/big; ls /feat/opq"],
            remove=True,
        ).decode()
        assert run == reference and run.startswith("hello-hardlink\n")
        # B read the contents from the bucket into its own cache, and stored nothing
        cached = [p for p in (cache_b).rglob("*") if p.is_file() and "/content/data/" in str(p)]
        assert cached, "B's content cache holds what its container read"
        assert _data_keys(s3_env, bucket) == written_by_a
        assert "entries" not in b.snapshotter.log.read_text()  # no layer was committed from data

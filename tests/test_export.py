"""`layerfs export` archives go back into the real daemon and through skopeo unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.exporter import ExportError, export_image
from layerfs.importer import import_from_docker
from layerfs.store.location import open_store
from tests.support.images import FEATURE_XATTR_FILE, build_feature_image
from tests.support.lfscommit import (
    docker_export,
    extract_rootfs,
    image_from_dir,
    tar_tree,
    unique,
)

pytestmark = [pytest.mark.docker]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


def _inspect(tag: str) -> dict:
    return json.loads(_run("docker", "image", "inspect", tag).stdout)[0]


@pytest.fixture(scope="module")
def feature(docker_client, busybox_image):
    """A three-layer image with every layer feature, imported into a fresh store."""
    tag = f"{unique('lfscommit-feature')}:1"
    build_feature_image(docker_client, tag)
    try:
        yield tag
    finally:
        _run("docker", "rmi", "-f", tag)


@pytest.fixture
def loaded():
    """Tags this test loads into the daemon; removed afterwards."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        _run("docker", "rmi", "-f", tag)


def test_imported_image_exports_to_the_same_tree(tmp_path: Path, feature, loaded) -> None:
    store = open_store(str(tmp_path / "store"))
    image = import_from_docker(store, feature)
    name = f"{unique('lfscommit-back')}:1"
    result = export_image(store, image, tmp_path / "out.tar", name=name)
    proc = _run("docker", "load", "-i", str(tmp_path / "out.tar"))
    loaded.append(name)
    assert proc.returncode == 0, proc.stderr
    inspect = _inspect(name)
    assert inspect["Id"] == result.image_id
    assert len(inspect["RootFS"]["Layers"]) == len(image.layers)
    original, back = tar_tree(docker_export(feature)), tar_tree(docker_export(name))
    assert back == original
    xattrs = dict(original[FEATURE_XATTR_FILE][7])
    assert "SCHILY.xattr.security.capability" in xattrs, "the test must cover xattrs"


def test_imported_image_as_oci_archive(tmp_path: Path, feature, loaded) -> None:
    store = open_store(str(tmp_path / "store"))
    image = import_from_docker(store, feature)
    oci = tmp_path / "out-oci.tar"
    result = export_image(store, image, oci, "oci")
    inspect = _run("skopeo", "inspect", f"oci-archive:{oci}")
    assert inspect.returncode == 0, inspect.stderr
    layers = json.loads(inspect.stdout)["Layers"]
    assert len(layers) == len(image.layers)
    config = json.loads(_run("skopeo", "inspect", "--config", f"oci-archive:{oci}").stdout)
    assert config["rootfs"]["diff_ids"] == layers  # uncompressed: digest == DiffID
    name = f"{unique('lfscommit-oci')}:1"
    copied = tmp_path / "copied.tar"
    proc = _run("skopeo", "copy", f"oci-archive:{oci}", f"docker-archive:{copied}:{name}")
    assert proc.returncode == 0, proc.stderr
    proc = _run("docker", "load", "-i", str(copied))
    loaded.append(name)
    assert proc.returncode == 0, proc.stderr
    assert _inspect(name)["Id"] == result.image_id
    assert tar_tree(docker_export(name)) == tar_tree(docker_export(feature))


def test_layers_written_by_layerfs_keep_their_diffids(tmp_path: Path, feature, loaded) -> None:
    """A layer whose tar layerfs wrote regenerates bit for bit: DiffID and id hold."""
    store = open_store(str(tmp_path / "store"))
    extract_rootfs(docker_export(feature), tmp_path / "root")
    name = f"{unique('lfscommit-dir')}:1"
    image = image_from_dir(store, tmp_path / "root", name)
    result = export_image(store, image, tmp_path / "out.tar")
    assert result.rewritten == [] and result.image_id == image.id
    proc = _run("docker", "load", "-i", str(tmp_path / "out.tar"))
    loaded.append(name)
    assert proc.returncode == 0, proc.stderr
    inspect = _inspect(name)
    assert inspect["Id"] == image.id
    assert inspect["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "layerfs")
    store = str(tmp_path / "store")
    proc = _run(exe, "--store", store, "export", "no-such-image", "-o", str(tmp_path / "x.tar"))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no image named 'no-such-image'" in proc.stderr
    assert not (tmp_path / "x.tar").exists()


def test_export_into_missing_directory_is_refused(tmp_path: Path, feature) -> None:
    store = open_store(str(tmp_path / "store"))
    image = import_from_docker(store, feature)
    with pytest.raises(ExportError, match="does not exist"):
        export_image(store, image, tmp_path / "nowhere" / "out.tar")

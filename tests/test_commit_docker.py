"""The same change script run by Docker (`docker run` + `docker commit`) and in a writable
mount (chroot, then `layerfs commit` + `layerfs export` + `docker load`) gives the same tree,
and `layerfs diff` lists what `docker diff` lists.

The writable mount is `layerfs mount IMAGE MNT --upper DIR`: kernel overlayfs over the
image's view, as Docker's overlay2 is kernel overlayfs over its layer directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.imageconfig import chain_ids
from tests.support.dockerenv import docker_build
from tests.support.lfscommit import (
    docker_export,
    tar_tree,
    unique,
)

pytestmark = [pytest.mark.docker]

DOCKERFILE = """\
FROM {base}
RUN mkdir -p /data/big/nested /data/old/sub /data/keep \\
 && for i in $(seq 1 400); do echo "file $i" > /data/big/f$i; done \\
 && echo deep > /data/big/nested/d && echo hello > /data/old/sub/a \\
 && echo one > /data/keep/one && echo log > /data/keep/log \\
 && echo x > /data/keep/hl && ln /data/keep/hl /data/keep/hl2 && chmod 640 /data/keep/one
RUN echo second-layer > /data/keep/layer2 && ln -s keep/layer2 /data/l2link
"""

# busybox-static on Debian has no adduser applet: the script edits the files it would.
SCRIPT = """\
set -e
echo 'alice:x:1000:1000:Alice:/home/alice:/bin/sh' >> /etc/passwd
echo 'alice:x:1000:' >> /etc/group
mkdir -p /home/alice && echo 'export PS1=a' > /home/alice/.profile
chown -R 1000:1000 /home/alice && chmod 700 /home/alice
rm -rf /data/big
mkdir /data/big
echo new > /data/big/newfile
mv /data/old /data/renamed
ln /data/keep/one /data/keep/one-link
chmod 4711 /data/keep/one
chmod 600 /data/keep/log
echo more >> /data/keep/log
rm /data/keep/layer2
mkdir -p /opt/new/deep && echo deep > /opt/new/deep/file && ln -s ../new /opt/link
ln /opt/new/deep/file /opt/hard
rm /bin/vi
mkfifo /opt/fifo
"""


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, **kw)


def _layerfs(store: Path, *args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "layerfs")
    return _run(exe, "--store", str(store), *args)


@pytest.fixture(scope="module")
def docker_side(busybox_image, tmp_path_factory):
    """The lower image, and the script run by Docker itself (run, diff, commit, export)."""
    tmp = tmp_path_factory.mktemp("lfscommit-docker")
    prefix = unique("lfscommit")
    lower_tag, docker_tag, container = f"{prefix}-lower:1", f"{prefix}-docker:1", f"{prefix}-run"
    (tmp / "ctx").mkdir()
    (tmp / "ctx/Dockerfile").write_text(DOCKERFILE.format(base=busybox_image))
    try:
        docker_build(tmp / "ctx", lower_tag)
        _run(
            "docker",
            "run",
            "--network",
            "none",
            "--name",
            container,
            lower_tag,
            "sh",
            "-c",
            SCRIPT,
            check=True,
        )
        diff = _run("docker", "diff", container, check=True).stdout.split("\n")
        _run("docker", "commit", container, docker_tag, check=True)
        yield {
            "prefix": prefix,
            "lower_tag": lower_tag,
            "docker_diff": {tuple(line.split(" ", 1)) for line in diff if line},
            "docker_tree": tar_tree(docker_export(docker_tag)),
        }
    finally:
        _run("docker", "rm", "-f", container)
        for tag in (lower_tag, docker_tag):
            _run("docker", "rmi", "-f", tag)


@contextlib.contextmanager
def _layerfs_mount(store_dir: Path, lower_tag: str, tmp: Path):
    """The real thing: `layerfs mount IMAGE MNT --upper DIR`."""
    proc = _layerfs(store_dir, "import", "--from-docker", lower_tag)
    assert proc.returncode == 0, proc.stderr
    mnt = tmp / "mnt"
    mnt.mkdir()
    proc = _layerfs(store_dir, "mount", lower_tag, str(mnt), "--upper", str(tmp / "changes"))
    assert proc.returncode == 0, proc.stderr
    try:
        yield mnt
    finally:
        if _layerfs(store_dir, "umount", str(mnt)).returncode != 0:
            _run("umount", "-l", str(mnt))


MOUNTS = {"layerfs-mount": _layerfs_mount}


@pytest.fixture(scope="module", params=sorted(MOUNTS))
def scenario(request, docker_side, tmp_path_factory):
    """The script run in a writable mount, then commit, export, load; cleaned up after."""
    tmp = tmp_path_factory.mktemp("lfscommit-mount")
    prefix = unique(docker_side["prefix"])
    ours_tag, oci_tag = f"{prefix}-ours:1", f"{prefix}-oci:1"
    store_dir = tmp / "store"
    state: dict = dict(docker_side)
    try:
        with MOUNTS[request.param](store_dir, docker_side["lower_tag"], tmp) as mnt:
            state["empty_commit"] = _layerfs(store_dir, "commit", str(mnt), "-t", "x:y")
            _run("chroot", str(mnt), "/bin/sh", "-c", SCRIPT, check=True)
            state["diff"] = _layerfs(store_dir, "diff", str(mnt))
            state["commit"] = _layerfs(store_dir, "commit", str(mnt), "--tag", ours_tag)
            state["after_commit"] = os.listdir(mnt / "data/big")  # the mount goes on
        assert state["commit"].returncode == 0, state["commit"].stderr
        archive = tmp / "ours.tar"
        state["export"] = _layerfs(store_dir, "export", ours_tag, "-o", str(archive))
        assert state["export"].returncode == 0, state["export"].stderr
        state["load"] = _run("docker", "load", "-i", str(archive))
        state["ours_tree"] = tar_tree(docker_export(ours_tag))
        state["inspect"] = json.loads(_run("docker", "image", "inspect", ours_tag).stdout)[0]

        oci = tmp / "ours-oci.tar"
        state["oci_export"] = _layerfs(
            store_dir, "export", ours_tag, "--format", "oci", "-o", str(oci)
        )
        state["skopeo_inspect"] = _run("skopeo", "inspect", f"oci-archive:{oci}")
        copied = tmp / "copied.tar"
        state["skopeo_copy"] = _run(
            "skopeo", "copy", f"oci-archive:{oci}", f"docker-archive:{copied}:{oci_tag}"
        )
        if state["skopeo_copy"].returncode == 0:
            _run("docker", "load", "-i", str(copied), check=True)
            state["oci_tree"] = tar_tree(docker_export(oci_tag))
        yield state
    finally:
        for tag in (ours_tag, oci_tag):
            _run("docker", "rmi", "-f", tag)


def test_empty_mount_has_nothing_to_commit(scenario) -> None:
    result = scenario["empty_commit"]
    assert result.returncode == 1
    assert "nothing to commit" in result.stderr and "Traceback" not in result.stderr


def test_diff_lists_what_docker_diff_lists(scenario) -> None:
    assert scenario["diff"].returncode == 0, scenario["diff"].stderr
    ours = {tuple(line.split(" ", 1)) for line in scenario["diff"].stdout.splitlines()}
    assert ("D", "/data/big/f17") in ours and ("C", "/data") in ours
    assert ours == scenario["docker_diff"]


def test_commit_export_load_gives_dockers_tree(scenario) -> None:
    assert scenario["load"].returncode == 0, scenario["load"].stderr
    ours, docker = scenario["ours_tree"], scenario["docker_tree"]
    assert set(ours) == set(docker), set(ours) ^ set(docker)
    different = {p: (ours[p], docker[p]) for p in ours if ours[p] != docker[p]}
    assert not different
    assert ours["data/keep/one"][-1] == {"data/keep/one", "data/keep/one-link"}
    assert ours["home/alice"][1] & 0o7777 == 0o700 and ours["home/alice"][2:4] == (1000, 1000)
    assert "data/big/f1" not in ours and "data/old" not in ours
    assert "newfile" in scenario["after_commit"]


def test_loaded_image_has_our_diffids_and_chainid(scenario) -> None:
    inspect = scenario["inspect"]
    printed = scenario["commit"].stdout.split()
    diff_ids = inspect["RootFS"]["Layers"]
    assert len(diff_ids) == 4  # busybox, two RUN layers, the commit
    assert diff_ids[-1] in printed  # the committed layer's DiffID survived the round trip
    chain = chain_ids(diff_ids)[-1].removeprefix("sha256:")
    assert Path(f"/var/lib/docker/image/overlay2/layerdb/sha256/{chain}").is_dir()
    exported_id = scenario["export"].stdout.split()[-1]
    assert inspect["Id"] == exported_id


def test_oci_archive_reads_in_skopeo_and_loads(scenario) -> None:
    assert scenario["oci_export"].returncode == 0, scenario["oci_export"].stderr
    inspect = scenario["skopeo_inspect"]
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Layers"] == scenario["inspect"]["RootFS"]["Layers"]
    assert scenario["skopeo_copy"].returncode == 0, scenario["skopeo_copy"].stderr
    assert scenario["oci_tree"] == scenario["docker_tree"]

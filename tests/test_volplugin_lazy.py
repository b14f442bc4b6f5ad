"""Lazy restore through the real path: Ceph RGW store, private dockerd, the plugin process.

A backup of ~290 MB is created in a fresh bucket; `docker volume create -o from=ID -o
lazy=true` must give a volume a container can read at once, while the fill (throttled
with VOLPLUGIN_LAZY_FILL_RATE) is still running; writes made meanwhile persist; Status
shows the progress growing to the end; a SIGKILL of the plugin in the middle of the fill
leaves the mount serving, and the restarted plugin resumes the fill without writing
again what was already local; after the switch a new container sees the backup plus the
writes from a plain directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from layerfs.fs.overlay import find_overlay
from layerfs.fs.service import find_image_mount
from tests.support.dockerenv import BASE_IMAGE
from tests.support.mounts import unmount_below
from tests.support.plugin import PluginProcess, remove_driver_objects
from tests.support.s3backup import cli, fill_random
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.s3]

FILES, FILE_SIZE = 24, 12 << 20  # 288 MiB of incompressible data
SLOW = "12M"  # bytes/s of the fill before the kill: ~24 s for the whole backup


@pytest.fixture
def source(s3_store_url, tmp_path: Path) -> tuple[str, Path, dict]:
    """A backup of a directory of random files in the RGW bucket: (backup id, dir, hashes)."""
    src = tmp_path / "src"
    fill_random(src, FILES, FILE_SIZE, seed=7)
    (src / "hello.txt").write_text("hello from the backup\n")
    (src / "sub").mkdir()
    (src / "sub" / "note").write_text("nested\n")
    out = cli("backup", "lazy-src", "--path", str(src), "--json", store=s3_store_url)
    hashes = {
        p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file()
    }
    return json.loads(out.stdout)["id"], src, hashes


def _lazy(plugin: PluginProcess, vol: str) -> dict:
    code, doc = plugin.call("VolumeDriver.Get", {"Name": vol})
    assert code == 200, doc
    return doc["Volume"]["Status"]["Lazy"]


def _sums(daemon, vol: str, paths: list[str]) -> dict[str, str]:
    out = daemon.docker(
        "run", "--rm", "-v", f"{vol}:/data", BASE_IMAGE, "sha256sum", *[f"/data/{p}" for p in paths]
    ).stdout
    return {line.split()[1].removeprefix("/data/"): line.split()[0] for line in out.splitlines()}


def test_lazy_volume_is_usable_at_once_and_survives_a_plugin_kill(
    daemon, s3_store_url, source, tmp_path: Path
) -> None:
    backup_id, _src, hashes = source
    root = tmp_path / "root"
    name = f"vp-lazy-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, DOCKER_HOST=daemon.host, LAYERFS_STORE=s3_store_url)
    plugin = PluginProcess(root, name, env=dict(env, VOLPLUGIN_LAZY_FILL_RATE=SLOW)).start()
    vol = "lazy-vol"
    try:
        daemon.docker(
            "volume", "create", "-d", name, "-o", f"from={backup_id}", "-o", "lazy=true", vol
        )
        volume_dir = root / "volumes" / vol
        mounted = find_image_mount(volume_dir)  # a kernel overlay over the backup's view
        assert mounted is not None and mounted.upper == root / "lazy" / vol / "upper"
        first = _lazy(plugin, vol)
        assert first["Phase"] == "filling"
        assert first["BytesTotal"] == FILES * FILE_SIZE + 22 + 7

        # a container reads at once, before the fill is done
        late = f"blob{FILES - 1:03}"
        seen = _sums(daemon, vol, ["hello.txt", late, "sub/note"])
        assert seen == {k: hashes[k] for k in ("hello.txt", late, "sub/note")}
        daemon.docker(
            "run", "--rm", "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c",
            "echo written while lazy > /data/new.txt && echo more >> /data/hello.txt"
            " && rm /data/blob000 && mkdir /data/made && echo x > /data/made/f",
        )  # fmt: skip
        # the first progress the fill reports: the throttle (each file takes at least its
        # size / SLOW) leaves more than 20 s of fill after it, whatever the load
        during = wait_for(
            lambda: (p := _lazy(plugin, vol))["BytesDone"] > 0 and p,
            "the fill to report progress",
            timeout=300,
        )
        assert during["Phase"] == "filling", "the fill ended before the test could look"
        assert 0 < during["BytesDone"] < during["BytesTotal"]

        # SIGKILL of the plugin in the middle of the fill: the mount keeps serving
        fill_dir = root / "lazy" / vol / "fill"
        wait_for(lambda: len(list(fill_dir.glob("blob*"))) >= 3, "some files filled", timeout=300)
        plugin.kill()
        kept = {p.name: p.stat().st_ino for p in fill_dir.glob("blob*")}
        assert 3 <= len(kept) < FILES
        assert (volume_dir / "new.txt").read_text() == "written while lazy\n"
        plugin = PluginProcess(root, name, env=dict(env, VOLPLUGIN_LAZY_FILL_RATE="")).start()

        progress = [_lazy(plugin, vol)]
        wait_for(
            lambda: progress.append(_lazy(plugin, vol)) or progress[-1]["Phase"] == "done",
            "the switch",
            timeout=300,
        )
        assert "mounting it again" not in plugin.log()  # it was found mounted
        done = [p["BytesDone"] for p in progress if p["Phase"] in ("filling", "filled")]
        assert done == sorted(done)
        assert progress[-1]["Progress"] == "100.0%"
        assert progress[-1]["BytesDone"] == progress[-1]["BytesTotal"]

        # an ordinary volume now: a plain directory with the backup plus the writes
        assert find_overlay(volume_dir) is None
        assert not (root / "lazy" / vol).exists()
        for blob, ino in kept.items():
            if blob != "blob000":
                assert (volume_dir / blob).stat().st_ino == ino, f"{blob} was filled again"
        want = {k: v for k, v in hashes.items() if k not in ("blob000", "hello.txt")}
        assert _sums(daemon, vol, sorted(want)) == want
        out = daemon.docker(
            "run", "--rm", "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c",
            "cat /data/new.txt /data/hello.txt /data/made/f; ls /data/blob000 || echo gone",
        ).stdout  # fmt: skip
        assert out.splitlines() == [
            "written while lazy",
            "hello from the backup",
            "more",
            "x",
            "gone",
        ]
        daemon.docker("volume", "rm", vol)
        assert not volume_dir.exists()
    finally:
        if plugin.proc is None:
            plugin.start()
        remove_driver_objects(daemon.env, name)
        plugin.cleanup()
        unmount_below(root)


def test_lazy_needs_an_existing_backup(daemon, s3_store_url, tmp_path: Path) -> None:
    root = tmp_path / "root"
    name = f"vp-lazy-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, DOCKER_HOST=daemon.host, LAYERFS_STORE=s3_store_url)
    plugin = PluginProcess(root, name, env=env).start()
    try:
        proc = daemon.docker(
            "volume", "create", "-d", name, "-o", "from=abcdef12", "-o", "lazy=true", "lazy-x",
            check=False,
        )  # fmt: skip
        assert proc.returncode != 0
        assert "no backup with id 'abcdef12'" in proc.stderr
        code, doc = plugin.call("VolumeDriver.List")
        assert doc["Volumes"] == []
        assert not (root / "lazy" / "lazy-x").exists()
    finally:
        remove_driver_objects(daemon.env, name)
        plugin.cleanup()
        unmount_below(root)

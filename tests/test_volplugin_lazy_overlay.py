"""Changes made by containers in a lazy volume, merged by the switch: the real path.

A private dockerd, the plugin process, a local store. A container renames a file and a
directory of the backup, chmods a big file (the kernel copies only its metadata up),
replaces a symlink to a host directory by a directory with a file in it, and swaps a
directory for a symlink to that host directory. The plugin is killed (its mount stays,
and the restarted plugin finds it mounted), the fill completes and the volume switches:
the volume then holds exactly what the mount showed, and the host directory is as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from layerfs.fs.overlay import find_overlay
from layerfs.fs.service import find_image_mount
from layerfs.store.location import open_store
from layerfs.union.vocab import XATTR_METACOPY, XATTR_REDIRECT
from tests.support.backuptree import describe, visible_links
from tests.support.dockerenv import BASE_IMAGE
from tests.support.mounts import unmount_below
from tests.support.plugin import PluginProcess, remove_driver_objects
from tests.support.waiting import wait_for
from tests.test_volplugin_lazy import _lazy
from volplugin.backup import service
from volplugin.lazy.state import LazyState

pytestmark = [pytest.mark.docker]

BIG = 24 << 20
SLOW = "1M"  # bytes/s of the fill: it is still running when the container is done


@pytest.fixture
def source(tmp_path: Path):
    """A backup in a local store: (store URL, backup id, the host directory, big's sha256)."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "keep").write_text("host file\n")
    src = tmp_path / "src"
    (src / "docs" / "sub").mkdir(parents=True)
    (src / "dir").mkdir()
    big = os.urandom(BIG)
    (src / "big").write_bytes(big)
    (src / "notes.txt").write_text("notes\n")
    (src / "docs" / "a.txt").write_text("a\n")
    (src / "docs" / "sub" / "c.txt").write_text("c\n")
    (src / "dir" / "file").write_text("file in dir\n")
    os.symlink(str(host), src / "trap")  # planted by a container before the backup
    url = str(tmp_path / "store")
    record = service.create_backup(open_store(url), "src", src)
    return url, record.id, host, hashlib.sha256(big).hexdigest()


def _change(daemon, vol: str, host: Path) -> None:
    """The container's changes (see the module docstring)."""
    daemon.docker(
        "run", "--rm", "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-e", "-c",
        "cd /data && mv notes.txt notes-renamed.txt && mv docs documents"
        " && echo new > documents/new.txt && chmod 600 big"
        " && rm trap && mkdir trap && echo inside > trap/f"
        f" && mv dir dir2 && ln -s {host} dir && chmod 640 dir2/file",
    )  # fmt: skip


def test_renames_chmod_and_symlinks_are_merged_as_the_mount_showed(
    daemon, source, tmp_path: Path
) -> None:
    url, backup_id, host, big_sum = source
    daemon.ensure_busybox()
    root = tmp_path / "root"
    name = f"vp-lazyov-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, DOCKER_HOST=daemon.host, LAYERFS_STORE=url)
    plugin = PluginProcess(root, name, env=dict(env, VOLPLUGIN_LAZY_FILL_RATE=SLOW)).start()
    vol = "lazy-ov"
    try:
        daemon.docker(
            "volume", "create", "-d", name, "-o", f"from={backup_id}", "-o", "lazy=true", vol
        )
        volume_dir = root / "volumes" / vol
        mounted = find_image_mount(volume_dir)
        assert mounted is not None and mounted.upper == root / "lazy" / vol / "upper"
        _change(daemon, vol, host)
        assert _lazy(plugin, vol)["Phase"] == "filling", "the fill ended before the test looked"
        upper = mounted.upper
        assert os.getxattr(upper / "big", XATTR_METACOPY) is not None
        assert os.stat(upper / "big").st_blocks * 512 < 64 << 10  # metadata only
        assert os.getxattr(upper / "documents", XATTR_REDIRECT) == b"docs"
        assert os.getxattr(upper / "notes-renamed.txt", XATTR_REDIRECT) == b"notes.txt"
        seen = describe(volume_dir)

        plugin.kill()  # the mount stays; the restarted plugin fills at full speed
        plugin = PluginProcess(root, name, env=dict(env, VOLPLUGIN_LAZY_FILL_RATE="")).start()
        wait_for(lambda: _lazy(plugin, vol)["Phase"] == "done", "the switch", timeout=300)
        assert "mounting it again" not in plugin.log()  # it was found mounted
        assert _lazy(plugin, vol)["Error"] is None

        assert find_overlay(volume_dir) is None
        assert not (root / "lazy" / vol).exists()
        assert visible_links(describe(volume_dir)) == visible_links(seen)
        assert sorted(p.name for p in host.iterdir()) == ["keep"]
        out = daemon.docker(
            "run", "--rm", "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c",
            "cd /data && sha256sum big && stat -c %a big && cat notes-renamed.txt"
            " documents/a.txt documents/sub/c.txt documents/new.txt trap/f dir2/file"
            " && readlink dir && ls",
        ).stdout.splitlines()  # fmt: skip
        assert out == [
            f"{big_sum}  big",
            "600",
            "notes",
            "a",
            "c",
            "new",
            "inside",
            "file in dir",
            str(host),
            "big",
            "dir",
            "dir2",
            "documents",
            "notes-renamed.txt",
            "trap",
        ]
        daemon.docker("volume", "rm", vol)
    finally:
        if plugin.proc is None:
            plugin.start()
        remove_driver_objects(daemon.env, name)
        plugin.cleanup()
        unmount_below(root)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_plugin_killed_during_the_merge_finishes_it_at_the_next_start(
    daemon, source, tmp_path: Path
) -> None:
    """SIGKILL of the plugin in the middle of the merge's apply phase (strace delivers it
    at the plugin's 8th link(2): the first 6 stage, the next ones link changes into
    place): the next start redoes the merge and finishes the switch."""
    url, backup_id, host, _big_sum = source
    daemon.ensure_busybox()
    root = tmp_path / "root"
    name = f"vp-lazyov-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, DOCKER_HOST=daemon.host, LAYERFS_STORE=url)
    plugin = PluginProcess(root, name, env=dict(env, VOLPLUGIN_LAZY_FILL_RATE=SLOW)).start()
    vol = "lazy-kill"
    tracer = None
    try:
        daemon.docker(
            "volume", "create", "-d", name, "-o", f"from={backup_id}", "-o", "lazy=true", vol
        )
        volume_dir = root / "volumes" / vol
        _change(daemon, vol, host)
        seen = describe(volume_dir)
        assert plugin.proc is not None
        # the fill (of a tree without hard links) makes no link(2): every one is the merge's
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(tmp_path / "strace.log"), "-e", "trace=link,linkat"]
            + ["-e", "inject=link,linkat:signal=KILL:when=8", "-p", str(plugin.proc.pid)],
        )
        assert plugin.proc.wait(timeout=300) == -signal.SIGKILL
        tracer.wait(timeout=30)
        plugin.proc = None
        state = LazyState(root / "state.db")
        try:
            assert state.get(vol).phase == "switching"
        finally:
            state.close()
        assert (root / "lazy" / vol / "merge" / "ready").exists()  # killed while applying
        assert find_overlay(volume_dir) is None

        plugin = PluginProcess(root, name, env=dict(env, VOLPLUGIN_LAZY_FILL_RATE="")).start()
        wait_for(lambda: _lazy(plugin, vol)["Phase"] == "done", "the switch", timeout=300)
        assert _lazy(plugin, vol)["Error"] is None
        assert not (root / "lazy" / vol).exists()
        assert visible_links(describe(volume_dir)) == visible_links(seen)
        assert sorted(p.name for p in host.iterdir()) == ["keep"]
        daemon.docker("volume", "rm", vol)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        if plugin.proc is None:
            plugin.start()
        remove_driver_objects(daemon.env, name)
        plugin.cleanup()
        unmount_below(root)

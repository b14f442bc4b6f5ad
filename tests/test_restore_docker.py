"""Restores through the real daemon and real plugin processes, on a local store.

- `docker volume create -o from=` of a crafted backup is refused naming the path,
  and nothing appears in the plugin's volumes directory or outside it.
- A busybox container swapping its volume's directories for symlinks to a host
  directory, in a tight loop, during 20 `volplugin restore --force` runs into
  that live volume: the host directory stays empty.
- SIGKILL of `volplugin serve` during `docker volume create -o from=`: after the
  restart the volume is complete (restored again before the plugin serves), and
  when its backup is gone by then, the volume is removed instead; never served
  half restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from layerfs.store.location import open_backend
from tests.support.plugin import VOLPLUGIN, PluginProcess, remove_driver_objects
from tests.support.waiting import wait_for
from tests.test_restore_confined import ROOT, crafted_file, listing, put_crafted
from volplugin.backup.restore import STAGING_PREFIX

pytestmark = [pytest.mark.docker]


def uniq(what: str) -> str:
    return f"vprs-{what}-{uuid.uuid4().hex[:6]}"


def start_plugin(daemon, base: Path, store: Path) -> PluginProcess:
    env = dict(os.environ, DOCKER_HOST=daemon.host, LAYERFS_STORE=str(store))
    return PluginProcess(base / "root", name=uniq("drv"), env=env).start()


def cli(plugin: PluginProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`volplugin --name NAME ARGS`: through the plugin's socket, with its store."""
    proc = subprocess.run(
        [VOLPLUGIN, "--name", plugin.name, *args],
        capture_output=True,
        text=True,
        env=plugin.env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"volplugin {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tree_digest(root: Path) -> dict[str, str]:
    """Each file's sha256 and each directory, by path (the root's own entries only)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def env(daemon, tmp_path):
    daemon.ensure_busybox()
    plugin = start_plugin(daemon, tmp_path, tmp_path / "store")
    yield daemon, plugin
    if plugin.proc is None:
        plugin.start()
    remove_driver_objects(daemon.env, plugin.name)
    plugin.cleanup()


def test_from_a_crafted_backup_is_refused_naming_the_path(env, tmp_path):
    daemon, plugin = env
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = "../../../outside/evil"
    for docs, path in (
        ([ROOT, crafted_file(bad)], bad),
        ([ROOT, {"p": "l", "k": "l", "l": str(outside)}, crafted_file("l/evil")], "l/evil"),
    ):
        backup_id = put_crafted(tmp_path / "store", docs)
        volumes = plugin.root / "volumes"
        before = listing(volumes), listing(outside)
        vol = uniq("crafted")
        proc = daemon.docker(
            "volume", "create", "-d", plugin.name, "-o", f"from={backup_id}", vol, check=False
        )
        assert proc.returncode != 0
        assert backup_id in proc.stderr and repr(path) in proc.stderr, proc.stderr
        assert (listing(volumes), listing(outside)) == before
        assert vol not in daemon.docker("volume", "ls", "-q").stdout.split()


SWAPPER = """
while true; do
  for i in 0 1 2 3 4 5 6 7; do
    rm -rf /v/d$i/deeper; ln -s {host} /v/d$i/deeper 2>/dev/null
    rm -rf /v/d$i; ln -s {host} /v/d$i 2>/dev/null
  done
done
"""


def test_forced_restores_into_a_volume_whose_container_swaps_in_symlinks(env, tmp_path):
    daemon, plugin = env
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    vol = uniq("live")
    daemon.docker("volume", "create", "-d", plugin.name, vol)
    data = plugin.root / "volumes" / vol
    for i in range(8):
        deeper = data / f"d{i}" / "deeper"
        deeper.mkdir(parents=True)
        for j in range(20):
            (data / f"d{i}" / f"f{j}").write_text(f"file {i}.{j}\n")
            (deeper / f"g{j}").write_text(f"deeper {i}.{j}\n")
    backup_id = json.loads(cli(plugin, "backup", vol, "--json").stdout)["id"]

    swapper = daemon.docker(
        "run", "-d", "-v", f"{vol}:/v", "layerfs-test/busybox:base",
        "sh", "-c", SWAPPER.format(host=host_dir),
    ).stdout.strip()  # fmt: skip
    try:
        wait_for(lambda: (data / "d0").is_symlink(), "the container's first swap")
        outcomes = []
        for _ in range(20):
            proc = cli(plugin, "restore", backup_id, "--to", vol, "--force", check=False)
            outcomes.append(proc.returncode)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert os.listdir(host_dir) == [], (outcomes, proc.stderr)
    finally:
        daemon.docker("rm", "-f", swapper, check=False)
    assert os.listdir(host_dir) == []
    # With the container gone, a forced restore puts everything back.
    cli(plugin, "restore", backup_id, "--to", vol, "--force")
    assert (data / "d7" / "deeper" / "g19").read_text() == "deeper 7.19\n"
    assert not any(name.startswith(STAGING_PREFIX) for name in os.listdir(data))


def _big_volume(daemon, plugin: PluginProcess) -> tuple[str, dict[str, str]]:
    """A volume of 160 files of 1 MiB (random: nothing dedups), backed up; (backup id, digest)."""
    vol = uniq("big")
    daemon.docker("volume", "create", "-d", plugin.name, vol)
    data = plugin.root / "volumes" / vol
    for i in range(16):
        (data / f"d{i}").mkdir()
        for j in range(10):
            (data / f"d{i}" / f"f{j}.bin").write_bytes(os.urandom(1 << 20))
    backup_id = json.loads(cli(plugin, "backup", vol, "--json").stdout)["id"]
    return backup_id, tree_digest(data)


def _kill_during_from(daemon, plugin: PluginProcess, backup_id: str, vol: str) -> None:
    """Start `docker volume create -o from=`, SIGKILL the plugin once the restore runs."""
    target = plugin.root / "volumes" / vol
    creating = subprocess.Popen(
        ["docker", "volume", "create", "-d", plugin.name, "-o", f"from={backup_id}", vol],
        env=daemon.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def restoring() -> bool:
            try:
                return bool(os.listdir(target))
            except FileNotFoundError:
                return False

        wait_for(
            restoring, "the restore to start", interval=0.002, guard=lambda: creating.poll() is None
        )
        plugin.kill()
    finally:
        creating.kill()
        creating.wait()
    db = sqlite3.connect(plugin.root / "state.db")
    try:
        committed = db.execute("SELECT 1 FROM volumes WHERE name = ?", (vol,)).fetchone()
    finally:
        db.close()
    assert committed, "the kill must land after the volume's record was committed"
    placed = [p for p in tree_digest(target) if STAGING_PREFIX not in p]
    assert len(placed) < 160 + 16, "the restore ended before the kill: use a bigger backup"


def test_sigkill_during_create_from_resumes_the_restore(env):
    daemon, plugin = env
    backup_id, expected = _big_volume(daemon, plugin)
    vol = uniq("seeded")
    _kill_during_from(daemon, plugin, backup_id, vol)

    plugin.start()  # restores the volume again before it serves
    (info,) = json.loads(daemon.docker("volume", "inspect", vol).stdout)
    assert info["Status"]["Options"] == {"from": backup_id}
    assert tree_digest(plugin.root / "volumes" / vol) == expected
    assert "was interrupted; restoring it again" in plugin.log()
    daemon.docker("volume", "create", "-d", plugin.name, "-o", f"from={backup_id}", vol)
    out = daemon.docker(
        "run", "--rm", "-v", f"{vol}:/r", "layerfs-test/busybox:base",
        "sh", "-c", "find /r -type f | wc -l",
    ).stdout  # fmt: skip
    assert out.strip() == "160"


def test_sigkill_during_create_from_of_a_backup_gone_since_removes_the_volume(env, tmp_path):
    daemon, plugin = env
    backup_id, expected = _big_volume(daemon, plugin)
    vol = uniq("orphan")
    _kill_during_from(daemon, plugin, backup_id, vol)
    repo = open_backend(str(tmp_path / "store"))
    doc = f"backups/{backup_id}.json"
    kept = repo.get_doc(doc)
    repo.delete_doc(doc)  # the backup is gone when the plugin starts again

    plugin.start()
    assert "removing the volume" in plugin.log()
    assert daemon.docker("volume", "inspect", vol, check=False).returncode != 0
    assert not (plugin.root / "volumes" / vol).exists()

    repo.put_doc(doc, kept)  # back: a new Create restores it afresh
    daemon.docker("volume", "create", "-d", plugin.name, "-o", f"from={backup_id}", vol)
    assert tree_digest(plugin.root / "volumes" / vol) == expected

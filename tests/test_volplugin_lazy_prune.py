"""A prune while a lazy volume reads from its source backup, through the real path.

Ceph RGW store, a private dockerd, the plugin process: a lazy volume is created from a
backup, its fill throttled (VOLPLUGIN_LAZY_FILL_RATE) so that it is still running when
the backup is forgotten and a prune with no grace removes whatever nothing references.
The volume's backup tree is pinned in the store, so every file still reads back whole
through a container, the fill completes and the volume switches; then the pin is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from layerfs.maintenance.pins import list_pins
from layerfs.store.location import open_store
from tests.support.dockerenv import BASE_IMAGE
from tests.support.mounts import unmount_below
from tests.support.plugin import PluginProcess, remove_driver_objects
from tests.support.s3backup import cli, fill_random
from tests.support.waiting import wait_for
from tests.test_volplugin_lazy import _lazy

pytestmark = [pytest.mark.docker, pytest.mark.s3]

FILES, FILE_SIZE = 16, 4 << 20  # 64 MiB of incompressible data
RATE = "2M"  # the fill takes at least 32 s: it is still running after the prune


def _sums(daemon, vol: str) -> dict[str, str]:
    """sha256 of every file of the volume, read through a container."""
    out = daemon.docker(
        "run", "--rm", "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c",
        "cd /data && find . -type f | sort | xargs sha256sum",
    ).stdout  # fmt: skip
    return {line.split()[1].removeprefix("./"): line.split()[0] for line in out.splitlines()}


def test_a_prune_leaves_a_lazy_volume_readable_to_the_end(
    daemon, s3_store_url, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    fill_random(src, FILES, FILE_SIZE, seed=11)
    (src / "sub").mkdir()
    (src / "sub" / "note").write_text("nested\n")
    hashes = {
        p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file()
    }
    source = f"prune-src-{uuid.uuid4().hex[:6]}"
    backup_id = json.loads(
        cli("backup", source, "--path", str(src), "--json", store=s3_store_url).stdout
    )["id"]
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "only").write_text("a newer backup of the source, sharing nothing\n")
    cli("backup", source, "--path", str(newer), store=s3_store_url)

    root = tmp_path / "root"
    name = f"vp-lazy-{uuid.uuid4().hex[:6]}"
    env = dict(
        os.environ,
        DOCKER_HOST=daemon.host,
        LAYERFS_STORE=s3_store_url,
        LAYERFS_CACHE_DIR=str(tmp_path / "plugin-cache"),  # nothing the backups cached
        VOLPLUGIN_LAZY_FILL_RATE=RATE,
    )
    plugin = PluginProcess(root, name, env=env).start()
    vol = "lazy-pruned"
    try:
        daemon.docker(
            "volume", "create", "-d", name, "-o", f"from={backup_id}", "-o", "lazy=true", vol
        )
        wait_for(lambda: _lazy(plugin, vol)["BytesDone"] > 0, "the fill to start", timeout=300)

        # forget the volume's source backup and remove what nothing references, at once
        report = json.loads(
            cli(
                "prune", "--volume", source, "--keep-last", "1", "--grace", "0", "--json",
                store=s3_store_url,
            ).stdout
        )  # fmt: skip
        assert [b["id"] for b in report["remove"]] == [backup_id]
        assert _lazy(plugin, vol)["Phase"] == "filling", "the fill ended before the prune"
        store = open_store(s3_store_url)
        try:
            pins = list_pins(store.backend)
        finally:
            store.backend.close()
        assert [p.holder for p in pins] == [f"lazy volume {vol} from backup {backup_id}"]

        # every file reads back whole through the mount, while the fill goes on ...
        assert _sums(daemon, vol) == hashes
        # ... and the fill completes: the volume switches to its local copy
        wait_for(lambda: _lazy(plugin, vol)["Phase"] == "done", "the switch", timeout=600)
        lazy = _lazy(plugin, vol)
        assert lazy["Error"] is None
        assert lazy["BytesDone"] == lazy["BytesTotal"]
        assert _sums(daemon, vol) == hashes

        # the switch removed the pin: the next prune may take the forgotten data
        store = open_store(s3_store_url)
        try:
            assert list_pins(store.backend) == []
        finally:
            store.backend.close()
        daemon.docker("volume", "rm", vol)
    finally:
        remove_driver_objects(daemon.env, name)
        plugin.cleanup()
        unmount_below(root)

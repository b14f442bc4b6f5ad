"""The `volplugin` command line against a real `volplugin serve` (a subprocess).

The plugin has a non-default root, name and store; the CLI is given only --name: it
finds the plugin's socket and the plugin answers with its root and store (ls, inspect,
backups, backup, diff, verify, restore, prune). Direct commands (--root) that would
change a served root are refused in one line, read-only ones still read, and once the
plugin is gone a direct backup works. With an S3 store only the plugin has the
credentials: `volplugin backups` lists the bucket's backups through it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.plugin import VOLPLUGIN, PluginProcess, without_docker

CLEAN = ("LAYERFS_STORE", "VOLPLUGIN_ROOT", "VOLPLUGIN_NAME", "AWS_ACCESS_KEY_ID",
         "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")  # fmt: skip


def cli_env() -> dict[str, str]:
    """The CLI's environment: no store, root, name or S3 keys it could use on its own."""
    return {k: v for k, v in os.environ.items() if k not in CLEAN}


def volplugin(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [VOLPLUGIN, *args], capture_output=True, text=True, env=cli_env(), timeout=300
    )
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        assert proc.stderr == "" or "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("volplugin: error: "), proc.stderr
    return lines[0]


def ok(plugin: PluginProcess, endpoint: str, body: dict) -> dict:
    status, doc = plugin.call(endpoint, body)
    assert status == 200 and doc.get("Err") == "", (endpoint, doc, plugin.log())
    return doc


@pytest.fixture
def plugin(tmp_path: Path):
    env = dict(without_docker(tmp_path), LAYERFS_STORE=str(tmp_path / "plugin-store"))
    proc = PluginProcess(tmp_path / "elsewhere" / "root", env=env).start()
    try:
        yield proc
    finally:
        proc.cleanup()


def test_commands_find_the_plugin_by_name_alone(plugin: PluginProcess, tmp_path: Path) -> None:
    name = ["--name", plugin.name]
    ok(plugin, "VolumeDriver.Create", {"Name": "docs", "Opts": {"mode": "0750"}})
    ok(plugin, "VolumeDriver.Create", {"Name": "empty"})
    ok(plugin, "VolumeDriver.Mount", {"Name": "docs", "ID": "c1"})
    data = plugin.root / "volumes" / "docs"
    (data / "a.txt").write_text("first\n")

    listing = volplugin(*name, "ls").stdout.splitlines()
    assert listing[0].split() == ["NAME", "SIZE", "CONTAINERS", "CREATED"]
    assert [(row.split()[0], row.split()[-2]) for row in listing[1:]] == [
        ("docs", "1"),
        ("empty", "0"),
    ]
    as_json = json.loads(volplugin("ls", "--json", *name).stdout)  # options after the command
    got = ok(plugin, "VolumeDriver.Get", {"Name": "docs"})["Volume"]
    assert as_json[0]["Mountpoint"] == got["Mountpoint"] == str(data)
    assert as_json[0]["Status"]["Options"] == {"mode": "0750"}
    shown = volplugin(*name, "inspect", "docs").stdout
    assert f"Mountpoint:  {data}" in shown and "Options:     mode=0750" in shown
    assert "Containers:  1" in shown and "Last backup: never" in shown
    assert json.loads(volplugin(*name, "inspect", "docs", "--json").stdout)["Name"] == "docs"
    missing = one_error_line(volplugin(*name, "inspect", "nope", check=False))
    assert "no such volume 'nope'" in missing
    ok(plugin, "VolumeDriver.Unmount", {"Name": "docs", "ID": "c1"})  # no docker to quiet it

    first = json.loads(volplugin(*name, "backup", "docs", "--tag", "t1", "--json").stdout)
    assert first["volume"] == "docs" and first["files"] == 1 and first["tags"] == ["t1"]
    (data / "a.txt").write_text("second\n")
    (data / "b.txt").write_text("new\n")
    out = volplugin(*name, "backup", "docs").stdout.splitlines()
    assert out[0].startswith("backed up docs: 2 files")
    second = out[1].removeprefix("backup ")
    assert "Last backup: " + second in volplugin(*name, "inspect", "docs").stdout

    table = volplugin(*name, "backups").stdout.splitlines()
    assert [row.split()[0] for row in table[1:]] == [first["id"][:12], second[:12]]
    listed = json.loads(volplugin(*name, "backups", "docs", "--json").stdout)
    assert [b["id"] for b in listed] == [first["id"], second]
    assert (tmp_path / "plugin-store").is_dir()  # the plugin's store, never named to the CLI

    changes = volplugin(*name, "diff", first["id"], second).stdout.splitlines()
    assert "+ b.txt" in changes and any(c.startswith("M a.txt") for c in changes)
    assert "no damage found" in volplugin(*name, "verify", "--read-data").stdout

    restored = volplugin(*name, "restore", first["id"], "--to", "copy").stdout
    assert restored.startswith(f"restored backup {first['id']} into ")
    assert (plugin.root / "volumes" / "copy" / "a.txt").read_text() == "first\n"
    assert "copy" in volplugin(*name, "ls").stdout

    pruned = volplugin(*name, "prune", "--keep-last", "1", "--grace", "0").stdout.splitlines()
    assert pruned[-1].startswith("removed 1 backups")
    assert any(line.startswith(f"forget {first['id'][:12]} ") for line in pruned), pruned
    left = json.loads(volplugin(*name, "backups", "--json").stdout)
    assert [b["id"] for b in left] == [second]


def test_direct_changes_of_a_served_root_are_refused(plugin: PluginProcess, tmp_path: Path) -> None:
    ok(plugin, "VolumeDriver.Create", {"Name": "held"})
    (plugin.root / "volumes" / "held" / "f").write_text("x\n")
    backup_id = ok(plugin, "Backup.Create", {"Volume": "held", "Wait": True})
    backup_id = (backup_id.get("Backup") or backup_id["Job"]["Result"]["Backup"])["id"]
    root = ["--root", str(plugin.root)]
    expected = (
        f"volplugin: error: a `volplugin serve` is running on the root {plugin.root}: drop "
        f"--root (and --store) so that `volplugin --name {plugin.name} COMMAND` goes through "
        "the plugin's socket"
    )
    for command, args in (
        ("backup", ["backup", "held"]),
        ("restore", ["restore", backup_id, "--to", "other"]),
        ("prune", ["prune", "--keep-last", "1"]),
    ):
        line = one_error_line(volplugin(*root, *args, check=False))
        assert line == expected.replace("COMMAND", command)
    assert not (plugin.root / "volumes" / "other").exists()
    assert len(ok(plugin, "Backup.List", {})["Backups"]) == 1

    # reading a served root directly still works
    assert "held" in volplugin(*root, "ls").stdout
    assert "Last backup: " + backup_id in volplugin(*root, "inspect", "held").stdout
    listed = json.loads(volplugin(*root, "backups", "--json").stdout)  # the recorded store
    assert [b["id"] for b in listed] == [backup_id]

    plugin.stop()
    done = json.loads(volplugin(*root, "backup", "held", "--json").stdout)
    assert done["volume"] == "held" and done["files"] == 1
    gone = one_error_line(volplugin("--name", plugin.name, "ls", check=False))
    assert f"no plugin named {plugin.name} is running: no socket at {plugin.socket}" in gone


@pytest.mark.s3
def test_backup_and_backups_through_a_plugin_with_an_s3_store(
    s3_store_url: str, tmp_path: Path
) -> None:
    env = dict(without_docker(tmp_path), LAYERFS_STORE=s3_store_url)
    plugin = PluginProcess(tmp_path / "root", env=env).start()
    try:
        ok(plugin, "VolumeDriver.Create", {"Name": "s3vol"})
        (plugin.root / "volumes" / "s3vol" / "data").write_text("in the bucket\n")
        assert "AWS_SECRET_ACCESS_KEY" not in cli_env()  # only the plugin can read the bucket
        record = json.loads(volplugin("--name", plugin.name, "backup", "s3vol", "--json").stdout)
        assert record["volume"] == "s3vol" and record["files"] == 1
        listed = json.loads(volplugin("--name", plugin.name, "backups", "--json").stdout)
        assert [(b["id"], b["volume"]) for b in listed] == [(record["id"], "s3vol")]
        table = volplugin("--name", plugin.name, "backups", "s3vol").stdout
        assert record["id"][:12] in table
    finally:
        plugin.cleanup()

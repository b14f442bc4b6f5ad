"""ROOT/plugin.json: written by serve, read by the CLI to find the plugin's name and store."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from volplugin.cli import cli
from volplugin.errors import StateError
from volplugin.pluginrecord import (
    PluginRecord,
    read_record,
    record_path,
    resolve_name,
    resolve_store,
    write_record,
)


def test_record_round_trip_mode_0600(tmp_path: Path) -> None:
    write_record(tmp_path, "vp-x", "s3://b/p")
    assert read_record(tmp_path) == PluginRecord("vp-x", "s3://b/p")
    assert stat.S_IMODE(record_path(tmp_path).stat().st_mode) == 0o600
    write_record(tmp_path, "vp-y", None)  # replaced
    assert read_record(tmp_path) == PluginRecord("vp-y", None)
    assert [p.name for p in tmp_path.iterdir()] == ["plugin.json"]  # no temporary left


def test_relative_store_recorded_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_record(tmp_path, "n", "store")
    assert read_record(tmp_path).store == str(tmp_path / "store")


def test_no_record(tmp_path: Path) -> None:
    assert read_record(tmp_path) is None
    assert resolve_name(tmp_path, None) == "volplugin"
    assert resolve_store(tmp_path, None) is None
    with pytest.raises(StateError, match="give --name NAME"):
        resolve_name(tmp_path, None, required=True)


def test_explicit_wins_over_record(tmp_path: Path) -> None:
    write_record(tmp_path, "recorded", "/s")
    assert resolve_name(tmp_path, None, required=True) == "recorded"
    assert resolve_name(tmp_path, "given", required=True) == "given"
    assert resolve_store(tmp_path, None) == "/s"
    assert resolve_store(tmp_path, "/other") == "/other"


def test_damaged_record_is_a_clear_error(tmp_path: Path) -> None:
    record_path(tmp_path).write_text(json.dumps({"store": "/s"}))
    with pytest.raises(StateError, match="damaged"):
        resolve_name(tmp_path, None)


def test_cli_backup_without_name_or_record_refuses(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VOLPLUGIN_NAME", raising=False)
    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "store"))
    result = CliRunner().invoke(cli, ["--root", str(tmp_path / "root"), "backup", "v1"])
    assert result.exit_code == 1
    assert "give --name NAME" in result.output

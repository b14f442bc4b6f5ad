"""Small hardening of volplugin: long names, prune's grace, deep JSON, hook output, inspect.

- Removing a volume whose name is 223..255 characters removes its data (the trash entry
  once had the name plus a 33-character suffix, over the 255-byte limit, and the data
  stayed for the next Create to adopt); a longer name is refused at Create.
- Prune's grace must be a finite number of seconds >= 0 (service, CLI, endpoint).
- A deeply nested JSON body sent to a real serving plugin gives an Err, no traceback.
- A hook command's output is read with a bound: a command printing 64 MiB costs little
  memory and its end is kept.
- `volplugin inspect` prints stored text (hook output in the backup detail) with its
  control characters escaped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.store.location import open_store
from tests.support.plugin import VOLPLUGIN, running_plugin, without_docker
from volplugin.backup import service
from volplugin.backup.errors import BackupError
from volplugin.backup.hooks import MAX_OUTPUT, Quiesce, Target, read_tail
from volplugin.backup.retention import Policy
from volplugin.backup.volumes import record_outcome
from volplugin.errors import BadName
from volplugin.volumes.containers import ContainerRef
from volplugin.volumes.service import VolumeService


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[VolumeService]:
    service_ = VolumeService.open(tmp_path / "root", "vp-hard")
    yield service_
    service_.state.close()


@pytest.mark.parametrize("length", [200, 223, 240, 255])
def test_removing_a_long_named_volume_removes_its_data(svc: VolumeService, length: int) -> None:
    name = "v" * length
    svc.create(name, {})
    path = svc.path_of(name)
    (path / "kept.txt").write_text("old data")
    svc.remove(name)
    assert not path.exists()
    assert list(svc.trash_dir.iterdir()) == []
    svc.create(name, {})
    assert list(svc.path_of(name).iterdir()) == []  # a new volume, not the old data


def test_a_name_too_long_for_the_filesystem_is_refused_at_create(svc: VolumeService) -> None:
    with pytest.raises(BadName) as info:
        svc.create("v" * 256, {})
    assert "256 characters" in str(info.value) and "255" in str(info.value)
    assert list(svc.volumes_dir.iterdir()) == []


@pytest.mark.parametrize("grace", [math.nan, -1.0, -0.001, math.inf])
def test_prune_refuses_a_grace_that_is_not_a_finite_number(tmp_path: Path, grace: float) -> None:
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(BackupError) as info:
        service.prune_backups(store, Policy(last=1), grace_seconds=grace)
    assert "grace" in str(info.value) and "finite number of seconds, 0 or more" in str(info.value)


@pytest.mark.parametrize("grace", ["nan", "-5", "inf"])
def test_prune_cli_refuses_a_bad_grace(tmp_path: Path, grace: str) -> None:
    done = subprocess.run(
        [VOLPLUGIN, "prune", "--keep-last", "1", "--grace", grace, "--store", str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "--grace" in done.stderr and "finite number of seconds" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_deep_json_and_a_bad_grace_get_an_err_from_a_serving_plugin(tmp_path: Path) -> None:
    env = dict(without_docker(tmp_path), LAYERFS_STORE=str(tmp_path / "store"))
    with running_plugin(tmp_path / "root", env=env) as plugin:
        depth = 30_000  # within the 64 KiB body limit
        for body in (
            b"[" * depth + b"]" * depth,
            b'{"Name": ' + b"[" * depth + b"]" * depth + b"}",
            b'{"Opts": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b', "Name": "x"}',
        ):
            for endpoint in ("VolumeDriver.Create", "Backup.Prune"):
                status, doc = plugin.call(endpoint, body)
                assert status == 500 and "nested too deeply" in doc["Err"], doc
        for grace in (b"NaN", b"-1", b"Infinity"):
            status, doc = plugin.call("Backup.Prune", b'{"KeepLast": 1, "Grace": ' + grace + b"}")
            assert status == 500 and "finite number of seconds" in doc["Err"], doc
        status, doc = plugin.call("VolumeDriver.Create", {"Name": "still-fine"})
        assert status == 200 and doc["Err"] == ""
        log = plugin.log()
    assert "Traceback" not in log and "internal error" not in log


class _Api:
    """The part of docker's APIClient that Quiesce._exec uses; output made on demand."""

    def __init__(self, chunks: int, chunk: int) -> None:
        self.chunks, self.chunk = chunks, chunk

    def exec_create(self, container: str, cmd: list[str]) -> dict:
        return {"Id": "e1"}

    def _output(self) -> Iterator[bytes]:
        for i in range(self.chunks):
            yield bytes([65 + i % 26]) * self.chunk
        yield b"\nthe end\x1b[2J"

    def exec_start(self, exec_id: str, stream: bool = False, **kw: object) -> object:
        out = self._output()
        return out if stream else b"".join(out)

    def exec_inspect(self, exec_id: str) -> dict:
        return {"ExitCode": 3}


class _Client:
    def __init__(self, api: _Api) -> None:
        self.api = api


def test_hook_output_is_read_with_a_bound() -> None:
    quiesce = Quiesce(lambda: None, "vol", "drv")  # type: ignore[arg-type, return-value]
    quiesce._client = _Client(_Api(chunks=64, chunk=1 << 20))  # type: ignore[assignment]
    target = Target(ContainerRef("c1", "db", "running"), pre="dump")
    tracemalloc.start()
    try:
        action = quiesce._exec(target, "pre-backup", "dump")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading 64 MiB of output held {peak} bytes at once"
    assert not action.ok and action.detail.startswith("exit code 3, output: ...")
    assert action.detail.endswith("the end\x1b[2J")
    assert len(action.detail) < MAX_OUTPUT + 100


def test_read_tail_keeps_the_last_bytes() -> None:
    assert read_tail([b"abc", b"def"], limit=10) == b"abcdef"
    assert read_tail([b"abc", b"def", b"ghi"], limit=5) == b"...efghi"
    assert read_tail([b"x" * 20, b"yz"], limit=4) == b"...xxyz"
    assert read_tail([], limit=4) == b""


def test_inspect_escapes_control_characters(svc: VolumeService) -> None:
    svc.create("shown", {})
    evil = "hook pre-backup db: failed (exit 1, output: \x1b]0;owned\x07\x1b[2J\rgone\u202e)"
    record_outcome(svc, "shown", None, evil, trigger="cli")
    done = subprocess.run(
        [VOLPLUGIN, "inspect", "shown", "--root", str(svc.root), "--name", svc.driver],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for char in ("\x1b", "\x07", "\r", "\u202e"):
        assert char not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x0dgone\\u202e" in out
    as_json = subprocess.run(
        [VOLPLUGIN, "inspect", "shown", "--json", "--root", str(svc.root), "--name", svc.driver],
        capture_output=True,
        text=True,
    )
    assert json.loads(as_json.stdout)["Status"]["Backup"]["Detail"] == evil

"""The plugin run the systemd way: its repository password is the credential layerfs-password.

`volplugin serve` is started the way a unit with ``LoadCredential=layerfs-password:...``
starts it: ``$CREDENTIALS_DIRECTORY/layerfs-password`` holds the password,
LAYERFS_PASSWORD_FILE is not set, and the store is an encrypted repository on
the real Ceph RGW. Backups and restores over the plugin socket, and the
`volplugin` command line on the plugin's root, open it with the credential;
without one (or with a wrong one) serve does not start and the command line
fails, each with one line naming the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.plugin import PluginProcess, without_docker

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the plugin socket needs root")

BIN = Path(sys.executable).parent
CREDENTIAL = "layerfs-password"
PASSWORD_VARIABLES = (
    "LAYERFS_PASSWORD_FILE",
    "LAYERFS_PASSWORD_COMMAND",
    "CREDENTIALS_DIRECTORY",
    "LAYERFS_STORE",
)


def unit_env(tmp_path: Path, credentials: Path | None) -> dict[str, str]:
    """The environment systemd gives the unit: no password variable, maybe a credentials dir."""
    env = {k: v for k, v in without_docker(tmp_path).items() if k not in PASSWORD_VARIABLES}
    env["LAYERFS_TESTONLY_WEAKEN_KDF"] = "1"
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return env


def credentials_dir(path: Path, secret: str | None) -> Path:
    """A directory like systemd's /run/credentials/UNIT (read-only files, one per credential)."""
    path.mkdir()
    (path / "other-program-token").write_text("not ours\n")
    if secret is not None:
        (path / CREDENTIAL).write_text(secret + "\n")
    for f in path.iterdir():
        f.chmod(0o400)
    path.chmod(0o500)
    return path


@pytest.fixture
def encrypted_s3(s3_store_url: str, tmp_path: Path) -> str:
    """An encrypted repository on the RGW, made with the password the unit's credential holds."""
    pw = tmp_path / "init-password"
    pw.write_text("unit password\n")
    env = unit_env(tmp_path, None)
    proc = subprocess.run(
        [str(BIN / "layerfs"), "--store", s3_store_url, "--password-file", str(pw), "init"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("created encrypted repository ")
    return s3_store_url


@contextlib.contextmanager
def serving(root: Path, env: dict[str, str], store: str) -> Iterator[PluginProcess]:
    plugin = PluginProcess(root, env=env, args=("--store", store))
    plugin.start(timeout=60)
    try:
        yield plugin
    finally:
        plugin.cleanup()


def ok(plugin: PluginProcess, endpoint: str, doc: dict) -> dict:
    """A call that succeeded; a job (/Backup.Create, .Restore) is run to its end."""
    jobs = ("/Backup.Create", "/Backup.Restore", "/Backup.Prune")
    status, answer = plugin.job(endpoint, doc) if endpoint in jobs else plugin.call(endpoint, doc)
    assert status == 200 and answer.get("Err") == "", (endpoint, status, answer, plugin.log())
    return answer


def volplugin(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The `volplugin` command line on the plugin's root (it uses the store serve recorded)."""
    return subprocess.run(
        [str(BIN / "volplugin"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one error line of a failed `volplugin` command (it also logs at INFO level)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("volplugin: INFO: ")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("volplugin: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def test_backup_and_restore_with_the_systemd_credential(encrypted_s3: str, tmp_path: Path) -> None:
    env = unit_env(tmp_path, credentials_dir(tmp_path / "credentials", "unit password"))
    root = tmp_path / "root"
    with serving(root, env, encrypted_s3) as plugin:
        ok(plugin, "/VolumeDriver.Create", {"Name": "cred-src"})
        src = Path(ok(plugin, "/VolumeDriver.Path", {"Name": "cred-src"})["Mountpoint"])
        (src / "notes.txt").write_text("kept under the credential\n")
        (src / "sub").mkdir()
        (src / "sub" / "data.bin").write_bytes(os.urandom(300_000))
        backup = ok(plugin, "/Backup.Create", {"Volume": "cred-src"})["Backup"]
        assert backup["volume"] == "cred-src" and backup["files"] == 2

        restored = ok(plugin, "/Backup.Restore", {"Backup": backup["id"], "Volume": "cred-dst"})
        assert restored["Restore"]["id"] == backup["id"] and restored["Restore"]["files"] == 2
        dst = Path(ok(plugin, "/VolumeDriver.Path", {"Name": "cred-dst"})["Mountpoint"])
        assert (dst / "notes.txt").read_text() == "kept under the credential\n"
        assert (dst / "sub" / "data.bin").read_bytes() == (src / "sub" / "data.bin").read_bytes()

        listed = volplugin(root, env, "backups", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [b["id"] for b in json.loads(listed.stdout)] == [backup["id"]]
        out = tmp_path / "out"
        proc = volplugin(root, env, "restore", backup["id"][:12], "--to-dir", str(out))
        assert proc.returncode == 0, proc.stderr
        assert (out / "notes.txt").read_text() == "kept under the credential\n"

    # the credential opened an encrypted repository: another password does not
    wrong = unit_env(tmp_path, credentials_dir(tmp_path / "wrong-credentials", "not it"))
    one_error_line(volplugin(root, wrong, "backups"), "wrong password")


def serve_refused(tmp_path: Path, env: dict[str, str], store: str) -> subprocess.CompletedProcess:
    """Run `volplugin serve`, which must stop at once (before it listens)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    cmd = [str(BIN / "volplugin"), "serve", "--name", "vp-cred", "--root", str(tmp_path / "root")]
    proc = subprocess.run(
        [*cmd, "--plugin-dir", str(plugins), "--store", store],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert not (plugins / "vp-cred.sock").exists()
    return proc


def test_without_the_credential_the_plugin_does_not_start(
    encrypted_s3: str, tmp_path: Path
) -> None:
    # a unit with credentials for other programs, but not layerfs-password
    env = unit_env(tmp_path, credentials_dir(tmp_path / "credentials", None))
    line = one_error_line(serve_refused(tmp_path, env, encrypted_s3), "no password given")
    for way in ("--password-file", "LAYERFS_PASSWORD_FILE", "LAYERFS_PASSWORD_COMMAND", CREDENTIAL):
        assert way in line
    one_error_line(
        volplugin(tmp_path / "root", env, "backups", "--store", encrypted_s3),
        "no password given",
        CREDENTIAL,
    )
    one_error_line(
        volplugin(
            tmp_path / "root", unit_env(tmp_path, None), "backup", "v", "--store", encrypted_s3
        ),
        "no password given",
    )
    wrong = unit_env(tmp_path, credentials_dir(tmp_path / "wrong-credentials", "not it"))
    one_error_line(serve_refused(tmp_path, wrong, encrypted_s3), "wrong password")

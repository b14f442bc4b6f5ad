"""Repositories and their keys through the real `layerfs` command line.

`layerfs init`, `layerfs key list|add|remove|passwd`, the ways to give the
password, and the stores that are refused (wrong password, none, unencrypted
where encryption is expected, the earlier format) — each failure one line on
stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.repos import LAYERFS, clean_env, password_file, tiny_archive


def run(
    store: Path | str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LAYERFS, "--store", str(store), *args],
        capture_output=True,
        text=True,
        env=clean_env() if env is None else env,
        timeout=300,
    )


def ok(store: Path | str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = run(store, *args, env=env)
    assert proc.returncode == 0, f"layerfs {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one error line of a failed command, checked for each needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("layerfs: error: "), line
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def with_password(path: Path) -> list[str]:
    return ["--password-file", str(path)]


def image_names(store: Path | str, pw: Path) -> list[str]:
    rows = json.loads(ok(store, *with_password(pw), "images", "--json"))
    return sorted(row["name"] for row in rows)


def key_rows(store: Path | str, pw: Path) -> list[dict]:
    return json.loads(ok(store, *with_password(pw), "key", "list", "--json"))


def test_init_creates_an_encrypted_repository_once(tmp_path: Path) -> None:
    store, p1 = tmp_path / "store", password_file(tmp_path, "p1", "first password")
    out = ok(store, *with_password(p1), "init")
    assert out.startswith("created encrypted repository ")
    config = json.loads((store / "docs" / "config").read_bytes())
    assert config["format"] == "layerfs-repository" and config["encryption"] == "aes-256-gcm"
    assert len(os.listdir(store / "docs" / "keys")) == 1
    refused(run(store, *with_password(p1), "init"), "is a repository already")
    assert image_names(store, p1) == []


def test_wrong_and_missing_password(tmp_path: Path) -> None:
    store, p1 = tmp_path / "store", password_file(tmp_path, "p1", "first password")
    bad = password_file(tmp_path, "bad", "not the password")
    ok(store, *with_password(p1), "init")
    refused(run(store, *with_password(bad), "images"), "wrong password")
    refused(run(store, "images", env=clean_env(LAYERFS_PASSWORD_FILE=str(bad))), "wrong password")
    line = refused(run(store, "images"), "no password given")
    for way in ("--password-file", "LAYERFS_PASSWORD_FILE", "LAYERFS_PASSWORD_COMMAND"):
        assert way in line
    assert "layerfs-password" in line  # the systemd credential
    refused(run(store, *with_password(tmp_path / "absent"), "images"), "cannot read", "absent")


def test_two_keys_remove_and_passwd(tmp_path: Path) -> None:
    store = tmp_path / "store"
    p1 = password_file(tmp_path, "p1", "first password")
    p2 = password_file(tmp_path, "p2", "second password")
    p3 = password_file(tmp_path, "p3", "third password")
    ok(store, *with_password(p1), "init")
    ok(store, *with_password(p1), "import", str(tiny_archive(tmp_path / "a.tar", "one:1", b"1\n")))
    assert ok(store, *with_password(p1), "key", "add", "--new-password-file", str(p2)).startswith(
        "added key "
    )
    assert image_names(store, p2) == ["one:1"]

    rows = key_rows(store, p2)
    assert len(rows) == 2 and sum(r["current"] for r in rows) == 1
    second = next(r["id"] for r in rows if r["current"])
    first = next(r["id"] for r in rows if not r["current"])
    table = ok(store, *with_password(p2), "key", "list").splitlines()
    assert len(table) == 3  # a header and two keys
    assert [line for line in table if line.startswith("*")] == [
        next(line for line in table if second in line)
    ]
    assert [r["current"] for r in key_rows(store, p1) if r["id"] == first] == [True]

    assert ok(store, *with_password(p2), "key", "remove", first).strip() == f"removed key {first}"
    refused(run(store, *with_password(p1), "images"), "wrong password")
    # what was written under the first password is still read under the second
    ok(store, *with_password(p2), "import", str(tiny_archive(tmp_path / "b.tar", "two:2", b"2\n")))
    assert image_names(store, p2) == ["one:1", "two:2"]
    assert [r["id"] for r in key_rows(store, p2)] == [second]

    out = ok(store, *with_password(p2), "key", "passwd", "--new-password-file", str(p3))
    assert out.startswith(f"password changed: key {second} replaced by ")
    refused(run(store, *with_password(p2), "images"), "wrong password")
    assert image_names(store, p3) == ["one:1", "two:2"]
    assert len(key_rows(store, p3)) == 1


def test_the_last_key_and_the_current_key_are_not_removed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    p1 = password_file(tmp_path, "p1", "first password")
    p2 = password_file(tmp_path, "p2", "second password")
    ok(store, *with_password(p1), "init")
    (only,) = key_rows(store, p1)
    refused(run(store, *with_password(p1), "key", "remove", only["id"]), "last key")
    ok(store, *with_password(p1), "key", "add", "--new-password-file", str(p2))
    refused(
        run(store, *with_password(p1), "key", "remove", only["id"][:8]),
        "refusing to remove key",
        "your password opened",
    )
    refused(run(store, *with_password(p1), "key", "remove", "f" * 32 + "x"), "no key")
    assert len(key_rows(store, p1)) == 2 and len(key_rows(store, p2)) == 2


def test_password_command(tmp_path: Path) -> None:
    store = tmp_path / "store"
    p1 = password_file(tmp_path, "p1", "first password")
    ok(store, *with_password(p1), "init")
    good = clean_env(LAYERFS_PASSWORD_COMMAND="sh -c 'echo first password'")
    assert json.loads(ok(store, "images", "--json", env=good)) == []
    wrong = clean_env(LAYERFS_PASSWORD_COMMAND="sh -c 'echo something else'")
    refused(run(store, "images", env=wrong), "wrong password")
    failing = clean_env(LAYERFS_PASSWORD_COMMAND="sh -c 'echo vault is sealed >&2; exit 3'")
    refused(
        run(store, "images", env=failing),
        "LAYERFS_PASSWORD_COMMAND",
        "exited with status 3",
        "vault is sealed",
    )
    absent = clean_env(LAYERFS_PASSWORD_COMMAND="/nonexistent/ask-password")
    refused(run(store, "images", env=absent), "LAYERFS_PASSWORD_COMMAND", "not found")
    # --password-file comes before the command
    assert json.loads(ok(store, *with_password(p1), "images", "--json", env=wrong)) == []


def test_unencrypted_local_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert json.loads(ok(store, "images", "--json")) == []
    config = json.loads((store / "docs" / "config").read_bytes())
    assert config["encryption"] == "none"
    ok(store, "import", str(tiny_archive(tmp_path / "a.tar", "plain:1", b"plain\n")))
    p1 = password_file(tmp_path, "p1", "first password")
    refused(run(store, *with_password(p1), "images"), "not encrypted", "password was given")
    refused(run(store, "key", "list"), "not encrypted")
    refused(run(store, "init", "--insecure-no-encryption"), "is a repository already")
    assert [r["name"] for r in json.loads(ok(store, "images", "--json"))] == ["plain:1"]


def test_new_s3_store_needs_a_password_or_insecure_init(s3_store_url: str, tmp_path: Path) -> None:
    line = refused(run(s3_store_url, "images"), "layerfs init", "--insecure-no-encryption")
    assert "not a repository yet" in line
    out = ok(s3_store_url, "init", "--insecure-no-encryption")
    assert out.startswith("created unencrypted repository ")
    assert json.loads(ok(s3_store_url, "images", "--json")) == []
    p1 = password_file(tmp_path, "p1", "first password")
    refused(run(s3_store_url, *with_password(p1), "images"), "not encrypted")


def test_encrypted_s3_store(s3_store_url: str, tmp_path: Path) -> None:
    p1 = password_file(tmp_path, "p1", "first password")
    p2 = password_file(tmp_path, "p2", "second password")
    ok(s3_store_url, *with_password(p1), "init")
    archive = tiny_archive(tmp_path / "a.tar", "s3img:1", b"s3\n")
    ok(s3_store_url, *with_password(p1), "import", str(archive))
    refused(run(s3_store_url, *with_password(p2), "images"), "wrong password")
    refused(run(s3_store_url, "images"), "no password given")
    assert image_names(s3_store_url, p1) == ["s3img:1"]


def test_an_old_format_store_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "old"
    digest = "ab" + "cd" * 31
    (store / "objects" / "ab").mkdir(parents=True)
    (store / "objects" / "ab" / digest).write_bytes(b"\x00old blob")
    (store / "docs" / "images").mkdir(parents=True)
    (store / "docs" / "images" / "x.json").write_text('{"name": "x"}')
    p1 = password_file(tmp_path, "p1", "first password")
    for env in (clean_env(), clean_env(LAYERFS_PASSWORD_FILE=str(p1))):
        refused(run(store, "images", env=env), "written by an earlier layerfs")
    assert not (store / "docs" / "config").exists()


@pytest.mark.parametrize("insecure", [False, True])
def test_init_of_an_old_format_store_is_refused(tmp_path: Path, insecure: bool) -> None:
    store = tmp_path / "old"
    (store / "docs" / "images").mkdir(parents=True)
    (store / "docs" / "images" / "x.json").write_text('{"name": "x"}')
    p1 = password_file(tmp_path, "p1", "first password")
    args = ["init", "--insecure-no-encryption"] if insecure else [*with_password(p1), "init"]
    refused(run(store, *args), "earlier layerfs")
    assert not (store / "docs" / "config").exists()


def test_a_repository_that_lost_its_encryption_is_refused(s3_store_url: str, tmp_path: Path):
    """Someone with write access replaces an encrypted repository's config by an
    unencrypted one and deletes its keys: a host that saw it encrypted refuses to
    write plaintext there, even when started without a password."""
    from tests.support import ceph

    p1 = password_file(tmp_path, "p1", "first password")
    cache = {"LAYERFS_CACHE_DIR": str(tmp_path / "cache")}
    ok(s3_store_url, *with_password(p1), "init", env=clean_env(**cache))
    assert (
        json.loads(ok(s3_store_url, *with_password(p1), "images", "--json", env=clean_env(**cache)))
        == []
    )
    bucket, prefix = s3_store_url.removeprefix("s3://").split("/", 1)
    client = ceph.ensure_rgw().client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/docs/keys/")["Contents"]:
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    forged = {"format": "layerfs-repository", "version": 1, "id": "0" * 32,
              "encryption": "none", "created": "2026-12-02T00:00:00Z"}  # fmt: skip
    client.put_object(Bucket=bucket, Key=f"{prefix}/docs/config", Body=json.dumps(forged))
    refused(run(s3_store_url, "images", env=clean_env(**cache)), "not encrypted any more")
    # another host, which never saw it, has nothing to compare with: its operator decides
    other = clean_env(LAYERFS_CACHE_DIR=str(tmp_path / "other-cache"))
    assert json.loads(ok(s3_store_url, "images", "--json", env=other)) == []

"""A commit never reads through a symlink planted in the upper tree or the mount.

The container of a writable mount writes both its upper directory and (through
the mount) the merged tree. A directory swapped for a symlink to a host
directory after the upper was scanned must stop the commit, not read the host.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

import layerfs.changeset as changeset
from layerfs import confined
from layerfs.changeset import build_changeset, docker_diff
from layerfs.records import Entry, Kind
from layerfs.store.location import open_store

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs need root")

NAMES = [f"f{i}" for i in range(5)]


def _fill(path: Path, data: bytes) -> None:
    path.mkdir(parents=True)
    for name in NAMES:
        (path / name).write_bytes(data)


def _swap_after_scan(monkeypatch: pytest.MonkeyPatch, swapped: Path, host: Path) -> None:
    """Replace the directory ``swapped`` by a symlink to ``host`` once the upper is scanned."""
    scan = changeset.scan_upper

    def scan_then_swap(upper, mountpoint):  # noqa: ANN001, ANN202
        items = scan(upper, mountpoint)
        os.rename(swapped, swapped.with_name(swapped.name + ".moved"))
        os.symlink(host, swapped)
        return items

    monkeypatch.setattr(changeset, "scan_upper", scan_then_swap)


@pytest.fixture
def secret_dir(tmp_path: Path) -> tuple[Path, bytes]:
    secret = b"host-secret-" + secrets.token_hex(8).encode()
    host = tmp_path / "host"
    _fill(host, secret)
    return host, secret


@pytest.mark.parametrize("small", [True, False])
def test_upper_directory_swapped_for_a_symlink_stops_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret_dir, small: bool
) -> None:  # noqa: ANN001
    host, secret = secret_dir
    if not small:  # chunked rather than inline
        for name in NAMES:
            (host / name).write_bytes(secret * 1000)
    store = open_store(str(tmp_path / "store"))
    upper = tmp_path / "upper"
    _fill(upper / "a", b"mine")
    _swap_after_scan(monkeypatch, upper / "a", host)
    with pytest.raises(confined.Escape, match="'a'"):
        build_changeset(store, upper, tmp_path / "unused", {}, upper_exact=True)


def test_mount_directory_swapped_for_a_symlink_stops_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret_dir
) -> None:  # noqa: ANN001
    host, _secret = secret_dir
    store = open_store(str(tmp_path / "store"))
    upper, merged = tmp_path / "upper", tmp_path / "merged"
    _fill(upper / "a", b"")
    for name in NAMES:
        os.setxattr(upper / "a" / name, "trusted.overlay.metacopy", b"")  # bytes: the mount's
    _fill(merged / "a", b"mine")
    _swap_after_scan(monkeypatch, merged / "a", host)
    with pytest.raises(confined.Escape, match="'a'"):
        build_changeset(store, upper, merged, {})


def test_symlinks_in_the_upper_are_recorded_not_followed(tmp_path: Path, secret_dir) -> None:  # noqa: ANN001
    host, secret = secret_dir
    store = open_store(str(tmp_path / "store"))
    upper = tmp_path / "upper"
    upper.mkdir()
    os.symlink(host, upper / "link")
    os.symlink(host / "f0", upper / "filelink")
    entries = build_changeset(store, upper, tmp_path / "unused", {}, upper_exact=True)
    assert [(e.kind, e.path, e.target) for e in entries] == [
        (Kind.SYMLINK, "filelink", str(host / "f0")),
        (Kind.SYMLINK, "link", str(host)),
    ]
    lower = {"link": Entry("link", Kind.DIR, mode=0o755)}
    merged = tmp_path / "merged"
    merged.mkdir()
    os.symlink(host, merged / "link")
    os.symlink(host / "f0", merged / "filelink")
    assert docker_diff(upper, merged, lower) == [("A", "filelink"), ("C", "link")]
    assert all(secret not in (e.inline or b"") for e in entries)

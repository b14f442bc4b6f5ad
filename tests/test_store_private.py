"""A local store is private to its owner whatever the umask, and its lock names its holder.

Directories are 0700 and files 0600; an old store (0755/0644) is made private when
opened. Another user (nobody, through setpriv) can read nothing in it and cannot take
its lock. A process waiting for the lock gives up after its timeout with an error that
names the holder's pid and command.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.store.local import LocalBackend, StoreLocked

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
DIGEST = "ab" * 16


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (tmp_path is private to root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    path = Path(tempfile.mkdtemp(prefix="layerfs-private-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def _fill(backend: LocalBackend) -> None:
    backend.put_blob(DIGEST, b"secret chunk")
    backend.flush()
    backend.put_doc("backups/one.json", b'{"secret": true}')
    (backend.cache_dir() / "index").mkdir(mode=0o700, exist_ok=True)
    with backend.lock(exclusive=False):
        pass


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True)


def test_store_is_private_whatever_the_umask(open_dir: Path, loose_umask: None) -> None:
    root = open_dir / "store"
    backend = LocalBackend(root)
    _fill(backend)
    modes = _modes(root)
    pack = backend.blob_location(DIGEST)[0]
    assert pack in modes and "docs/backups/one.json" in modes and "lock" in modes
    for name, mode in modes.items():
        path = root / name
        want = 0o700 if path.is_dir() else 0o600
        assert mode == want, f"{name}: {mode:o}"

    for argv in (
        ["cat", str(backend.object_path(pack))],
        ["cat", str(root / "docs/backups/one.json")],
        ["ls", str(root)],
        ["ls", str(root / "packs")],
        ["flock", "--nonblock", str(root / "lock"), "true"],
        ["flock", "--nonblock", "--shared", str(root / "lock"), "true"],
    ):
        done = _as_nobody(*argv)
        assert done.returncode != 0, f"{argv} worked as nobody: {done.stdout}"
        assert "Permission denied" in done.stderr, done.stderr


def test_an_old_open_store_is_made_private(open_dir: Path, loose_umask: None) -> None:
    root = open_dir / "old"
    for sub in ("packs", "docs", "tmp", "cache"):
        (root / sub).mkdir(parents=True, mode=0o755)
    (root / "lock").write_bytes(b"")
    (root / "lock").chmod(0o644)
    root.chmod(0o755)
    assert _as_nobody("ls", str(root / "docs")).returncode == 0  # readable before

    LocalBackend(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for sub in ("packs", "docs", "tmp", "cache"):
        assert stat.S_IMODE((root / sub).stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "lock").stat().st_mode) == 0o600
    assert _as_nobody("ls", str(root / "docs")).returncode != 0


HOLDER = """
import sys, time
from layerfs.store.local import LocalBackend
with LocalBackend(sys.argv[1]).lock(exclusive=True):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_lock_times_out_naming_its_holder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalBackend(root)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), "prune-marker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        waiting = LocalBackend(root, lock_timeout=0.3)
        for exclusive in (False, True):
            with pytest.raises(StoreLocked) as info, waiting.lock(exclusive=exclusive):
                pass
            text = str(info.value)
            assert f"pid {holder.pid}" in text and "prune-marker" in text, text
            assert "exclusive" in text and "LAYERFS_LOCK_TIMEOUT" in text
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    with LocalBackend(root, lock_timeout=0.3).lock(exclusive=True):  # free again
        assert os.listdir(root / "locks") != []  # our own note
    assert os.listdir(root / "locks") == []


def test_lock_notes_of_killed_holders_are_ignored_and_forgotten(tmp_path: Path) -> None:
    root = tmp_path / "store"
    LocalBackend(root)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    holder.kill()
    holder.wait()
    backend = LocalBackend(root, lock_timeout=0.3)
    assert backend.objects.lock_holders() == []
    assert len(os.listdir(root / "locks")) == 1
    with backend.lock(exclusive=True):
        assert [h["pid"] for h in backend.objects.lock_holders()] == [os.getpid()]
    assert os.listdir(root / "locks") == []


@pytest.mark.s3
def test_s3_cache_is_private_whatever_the_umask(
    s3_store_url: str, tmp_path: Path, loose_umask: None
) -> None:
    """The local cache of an S3 store holds what the bucket holds: only its owner enters."""
    from layerfs.store import open_store
    from layerfs.store.chunks import chunk_offsets

    store = open_store(s3_store_url)
    refs = store.write_bytes(b"secret chunk " * 1000)
    store.flush()
    store.backend.close()
    store = open_store(s3_store_url)
    assert store.read(refs, chunk_offsets(refs), 0, 13) == b"secret chunk "  # cached
    cache = store.backend.cache_dir()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert any(cache.rglob("*")), "nothing was cached: the test would prove nothing"
    store.backend.close()

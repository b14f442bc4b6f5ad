"""Real directory trees for backup tests: every kind of file, and a full attribute listing."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

MTIME = 1_600_000_000_123_456_789


def make_tree(root: Path, seed: int = 1) -> None:
    """Fill ``root`` with files of every kind, odd modes, owners, xattrs and holes."""
    rnd = __import__("random").Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir()
    (root / "data" / "empty").write_bytes(b"")
    (root / "data" / "small.txt").write_text("hello backup\n")
    (root / "data" / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (root / "data" / "text.log").write_bytes(b"line of text\n" * 40000)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(64 << 20)
        f.seek(20 << 20)
        f.write(rnd.randbytes(100_000))
    os.link(root / "data" / "big.bin", root / "hard-to-big")
    os.link(root / "data" / "small.txt", root / "data" / "small-link")
    os.symlink("data/small.txt", root / "sym")
    os.symlink("/does/not/exist", root / "dangling")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o2775)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "data" / "small.txt", 1234, 5678)
    os.chown(root / "sym", 42, 43, follow_symlinks=False)
    os.chown(root / "shared", 1000, 1000)
    os.setxattr(root / "data" / "small.txt", "user.color", b"blue")
    os.setxattr(root / "shared", "user.note", b"\x00binary\xff")
    os.setxattr(root / "suid", "trusted.secret", b"t")
    name = os.fsencode(root / "data") + b"/caf\xe9-latin1"
    with open(name, "wb") as f:
        f.write(b"non-utf8 name\n")
    os.chmod(root / "data" / "empty", 0o600)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(MTIME, MTIME + 17), follow_symlinks=False)
    os.utime(root, ns=(MTIME, MTIME + 99))


def describe(root: Path) -> dict[bytes, tuple]:
    """Every attribute a restore must keep, by path (content as sha256, links as groups)."""
    out: dict[bytes, tuple] = {}
    groups: dict[int, bytes] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for n in [b"", *sorted(filenames + dirnames)] if dirpath == base else sorted(filenames):
            full = os.path.join(dirpath, n) if n else dirpath
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            xattrs = {
                k: os.getxattr(full, k, follow_symlinks=False)
                for k in sorted(os.listxattr(full, follow_symlinks=False))
            }
            content = None
            link = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    link = groups.setdefault(st.st_ino, rel)
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            mtime = st.st_mtime_ns
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                mtime,
                st.st_rdev if stat.S_ISCHR(st.st_mode) else 0,
                target,
                xattrs,
                content,
                link,
            )
    return out


def visible_links(described: dict[bytes, tuple]) -> dict[bytes, tuple]:
    """``describe``'s listing with link groups counted by the names listed: a name whose
    inode has other names only outside the tree (or hidden by a mount) is in no group.

    A kernel overlay (without index=on) shows a lower file's own link count even once
    its other name was copied up or deleted; merged onto a plain directory, the name
    left is alone.
    """
    members: dict[bytes, int] = {}
    for fields in described.values():
        if fields[-1] is not None:
            members[fields[-1]] = members.get(fields[-1], 0) + 1
    return {
        path: (*fields[:-1], fields[-1] if members.get(fields[-1], 0) > 1 else None)
        for path, fields in described.items()
    }


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def volplugin(*args: str, store: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `volplugin` command line against a store."""
    env = dict(os.environ, LAYERFS_STORE=str(store))
    cmd = [str(Path(sys.executable).parent / "volplugin"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def layerfs(*args: str, store: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `layerfs` command line against a store."""
    cmd = [str(Path(sys.executable).parent / "layerfs"), "--store", str(store), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_image(store, name: str, directory: Path):  # noqa: ANN001, ANN201 - test helper
    """Record a one-layer image made from a directory (without the importer)."""
    from layerfs.catalog import Catalog, ImageRecord, LayerRecord
    from layerfs.records import put_tree
    from volplugin.backup.snapshot import ParentTree, Scanner

    scan = Scanner(store, directory, ParentTree()).scan()
    tree = put_tree(store, scan.entries)
    store.flush()
    layer = LayerRecord(diff_id="sha256:" + hashlib.sha256(tree.encode()).hexdigest(), tree=tree)
    catalog = Catalog(store.backend)
    catalog.put_layer(layer)
    image = ImageRecord(name=name, id="sha256:" + "0" * 64, config={}, layers=[layer])
    catalog.put_image(image)
    return image


def age(path: Path, seconds: float) -> None:
    """Make a file look ``seconds`` old."""
    st = os.stat(path)
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def backed_up(tmp_path: Path, volume: str):  # noqa: ANN201 - test helper
    """make_tree's tree backed up as ``volume`` into a local store: (store URL, record, dir)."""
    from layerfs.store import open_store
    from volplugin.backup import service

    url = str(tmp_path / "store")
    directory = tmp_path / "vol"
    make_tree(directory)
    return url, service.create_backup(open_store(url), volume, directory), directory

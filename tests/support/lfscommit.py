"""Helpers of the commit/diff/export tests: images from directories, kernel overlay
mounts standing in for a writable mount, and trees as `docker export` shows them."""

from __future__ import annotations

import contextlib
import hashlib
import io
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from layerfs.catalog import Catalog, ImageRecord, LayerRecord
from layerfs.changeset import build_changeset
from layerfs.imageconfig import image_id
from layerfs.layertar import write_layer
from layerfs.records import Kind, put_tree
from layerfs.store.chunks import ChunkStore

# Files the daemon adds to every container; equal on both sides, ignored in comparisons.
DOCKER_RUNTIME_PATHS = {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def image_from_dir(store: ChunkStore, root: Path, name: str) -> ImageRecord:
    """Record the plain directory ``root`` as a one-layer image in the store."""
    entries = build_changeset(store, root, root, {})
    digest = write_layer(entries, store)
    tree = put_tree(store, entries, {"diff_id": digest.diff_id})
    layer = LayerRecord(digest.diff_id, tree, len(entries))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin:/usr/bin:/sbin"]},
        "created": "2026-01-01T00:00:00Z",
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "test"}],
        "rootfs": {"type": "layers", "diff_ids": [digest.diff_id]},
    }
    image = ImageRecord(name, image_id(config), config, [layer])
    store.flush()
    catalog = Catalog(store.backend)
    catalog.put_layer(layer)
    catalog.put_image(image)
    return image


@contextlib.contextmanager
def overlay_mount(lower: Path, base: Path) -> Iterator[tuple[Path, Path]]:
    """Kernel overlayfs over ``lower`` with its upper in ``base``; yields (mountpoint, upper)."""
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,index=off"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True)
    try:
        yield mnt, upper
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def docker_export(image: str) -> bytes:
    """`docker export` of a fresh container of ``image`` (the container is removed)."""
    cid = subprocess.run(
        ["docker", "create", image, "/bin/true"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        return subprocess.run(["docker", "export", cid], capture_output=True, check=True).stdout
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)


def extract_rootfs(data: bytes, dest: Path) -> None:
    """Unpack a `docker export` tar keeping owners, modes, links and xattrs."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(dest)],
        input=data,
        check=True,
    )


def tar_tree(data: bytes) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, size, sha256, link target, xattrs, link group)."""
    members: dict[str, tuple] = {}
    groups: dict[str, set[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            path = m.name.strip("/").removeprefix("./")
            if not path or path in DOCKER_RUNTIME_PATHS:
                continue
            xattrs = tuple(
                sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr."))
            )
            if m.islnk():
                target = m.linkname.strip("/").removeprefix("./")
                group = groups.setdefault(target, {target})
                group.add(path)
                groups[path] = group
                members[path] = ("link", target)
                continue
            content = ""
            if m.isfile():
                f = tar.extractfile(m)
                content = hashlib.sha256(f.read() if f else b"").hexdigest()
            kind = "dir" if m.isdir() else m.type.decode()
            size = m.size if m.isfile() else 0
            link = m.linkname if m.issym() else ""
            members[path] = (kind, m.mode, m.uid, m.gid, size, content, link, xattrs)
    out = {}
    for path, value in members.items():
        if value[0] == "link":
            value = members[value[1]]
        out[path] = (*value, frozenset(groups.get(path, {path})))
    return out


def entries_kinds(entries) -> list[tuple[str, str]]:
    return [(e.kind.value, e.path) for e in entries if e.kind is not Kind.DIR or e.path]

"""Real Docker test images for the import and mount tests, built on the busybox base.

Every image is built by the real daemon with the classic builder (DOCKER_BUILDKIT=0)
and tagged with the ``lfsimp/`` prefix. The *feature image* exercises every layer
rule the importer and the union view must honour:

* layer 1 (RUN): files to delete later, a directory to replace, a file with two
  hardlinks, symlinks (relative, absolute, dangling), setuid/setgid/sticky modes,
  char and block devices, a fifo, odd names (space, UTF-8, a 255-byte name), a
  file owned by 1234:5678, an empty file, 1.5 MB of random data;
* layer 2 (RUN): deletes a file (whiteout), deletes and recreates a directory
  (opaque), adds a hardlink to a file of layer 1, removes one of its hardlinks,
  copies the random file (dedup);
* layer 3 (ADD of a tar): a file with a binary ``security.capability`` xattr and
  a file whose name is not UTF-8 (``FEATURE_NON_UTF8_NAME``).

Helpers also write ``docker save`` archives and skopeo OCI layouts of an image.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import docker

from tests.support.dockerenv import docker_build, ensure_busybox_image

PREFIX = "lfsimp"
FEATURE_IMAGE = f"{PREFIX}/feature:latest"
SMALL_IMAGE = f"{PREFIX}/small:latest"
LARGE_IMAGE = f"{PREFIX}/large:latest"

LONG_NAME = "n" * 250 + ".long"  # 255 bytes
UTF8_NAME = "ünïcødé-名前.txt"
FEATURE_NON_UTF8_NAME = b"latin1-\xe9t\xe9.txt"
# A version-2 file capability: cap_net_bind_service in the permitted set.
FEATURE_CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")
FEATURE_XATTR_FILE = "feat/xa/cap-file"

_FEATURE_DOCKERFILE = f"""\
FROM {{base}}
RUN set -e; \\
    mkdir -p /feat/del /feat/opq/sub /feat/hl /feat/modes /feat/dev /feat/names /feat/data; \\
    echo a > /feat/del/a; echo b > /feat/del/b; echo keep > /feat/del/keep; \\
    echo x > /feat/opq/x; echo y > /feat/opq/sub/y; \\
    echo hello-hardlink > /feat/hl/orig; \\
    ln /feat/hl/orig /feat/hl/link1; ln /feat/hl/orig /feat/hl/gone; \\
    ln -s ../hl/orig /feat/names/rel-sym; ln -s /feat/hl/orig /feat/names/abs-sym; \\
    ln -s /nonexistent/target /feat/names/dangling; \\
    echo s > /feat/modes/setuid; chmod 4755 /feat/modes/setuid; \\
    echo g > /feat/modes/setgid; chmod 2711 /feat/modes/setgid; \\
    mkdir /feat/modes/sticky; chmod 1777 /feat/modes/sticky; \\
    echo ro > /feat/modes/readonly; chmod 0400 /feat/modes/readonly; \\
    mknod /feat/dev/char c 1 3; mknod /feat/dev/block b 7 0; mkfifo /feat/dev/fifo; \\
    echo sp > "/feat/names/with space"; echo u > "/feat/names/{UTF8_NAME}"; \\
    echo long > "/feat/names/{LONG_NAME}"; \\
    echo owned > /feat/owned; chown 1234:5678 /feat/owned; \\
    touch /feat/empty; \\
    dd if=/dev/urandom of=/feat/data/big bs=1024 count=1536 2>/dev/null
RUN set -e; \\
    rm /feat/del/a; \\
    rm -rf /feat/opq; mkdir /feat/opq; echo z > /feat/opq/z; \\
    ln /feat/hl/orig /feat/hl/upper; rm /feat/hl/gone; \\
    cp /feat/data/big /feat/data/big-copy
ADD xattr.tar /
"""


def _xattr_tar() -> bytes:
    """A tar holding a file with a binary security.capability and a non-UTF-8 name."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tar:
        for name in ("feat", "feat/xa"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = 1700000000
            tar.addfile(info)
        data = b"capable\n"
        info = tarfile.TarInfo(FEATURE_XATTR_FILE)
        info.size = len(data)
        info.mode = 0o755
        info.mtime = 1700000000
        # tarfile writes PAX values as UTF-8; a surrogate escape round-trips any byte.
        info.pax_headers = {
            "SCHILY.xattr.security.capability": FEATURE_CAPABILITY.decode(
                "utf-8", "surrogateescape"
            )
        }
        tar.addfile(info, io.BytesIO(data))
        data = b"non-utf8 name\n"
        name = "feat/xa/" + FEATURE_NON_UTF8_NAME.decode("utf-8", "surrogateescape")
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 1700000000
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _build(client: docker.DockerClient, tag: str, dockerfile: str, files: dict[str, bytes]) -> str:
    base = ensure_busybox_image(client)
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-ctx-") as ctx:
        root = Path(ctx)
        (root / "Dockerfile").write_text(dockerfile.format(base=base), encoding="utf-8")
        for name, data in files.items():
            (root / name).write_bytes(data)
        docker_build(root, tag)
    return tag


def build_feature_image(client: docker.DockerClient, tag: str = FEATURE_IMAGE) -> str:
    """Build the multi-layer feature image (see the module docstring); return its tag."""
    return _build(client, tag, _FEATURE_DOCKERFILE, {"xattr.tar": _xattr_tar()})


def build_small_image(client: docker.DockerClient, tag: str = SMALL_IMAGE) -> str:
    """A one-layer image on the busybox base; return its tag."""
    dockerfile = "FROM {base}\nRUN echo small > /small.txt && mkdir -p /srv && echo hi > /srv/hi\n"
    return _build(client, tag, dockerfile, {})


def build_large_image(client: docker.DockerClient, tag: str = LARGE_IMAGE, mb: int = 192) -> str:
    """An image with ``mb`` MB of random data over four layers; return its tag."""
    step = max(mb // 4, 1)
    runs = "".join(
        f"RUN dd if=/dev/urandom of=/large{i} bs=1M count={step} 2>/dev/null\n" for i in range(4)
    )
    return _build(client, tag, "FROM {base}\n" + runs, {})


def remove_images(client: docker.DockerClient, tags: list[str]) -> None:
    """Remove images this module built (missing ones are ignored)."""
    for tag in tags:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)


def docker_save(tag: str, dest: Path) -> Path:
    """`docker save` an image to ``dest`` (legacy format on dockerd 20.10)."""
    subprocess.run(["docker", "save", "-o", str(dest), tag], check=True, capture_output=True)
    return dest


def skopeo_copy(src: str, dest: str, zstd: bool = False) -> None:
    """`skopeo copy SRC DEST`, optionally recompressing layers with zstd."""
    cmd = ["skopeo", "copy", "-q"]
    if zstd:
        cmd += ["--dest-compress", "--dest-compress-format", "zstd"]
    subprocess.run([*cmd, src, dest], check=True, capture_output=True)


# -- archive editing -----------------------------------------------------------------------


def oci_blob(layout: Path, digest: str) -> bytes:
    """The bytes of a blob of an OCI layout directory."""
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def oci_put_blob(layout: Path, data: bytes) -> str:
    """Add a blob to an OCI layout directory; return its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def oci_manifest(layout: Path) -> tuple[dict, dict]:
    """(index.json, the one image manifest it names) of an OCI layout directory."""
    index = json.loads((layout / "index.json").read_text())
    return index, json.loads(oci_blob(layout, index["manifests"][0]["digest"]))


def oci_set_manifest(layout: Path, index: dict, manifest: dict) -> None:
    """Store an edited manifest and point index.json (first entry) at it."""
    data = json.dumps(manifest).encode()
    desc = index["manifests"][0]
    desc["digest"] = oci_put_blob(layout, data)
    desc["size"] = len(data)
    (layout / "index.json").write_text(json.dumps(index))


def tar_dir(src: Path, dest: Path) -> Path:
    """A plain tar of a directory's content (names relative to it)."""
    with tarfile.open(dest, "w") as tar:
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(src)), recursive=False)
    return dest


def make_docker25_archive(oci_layout: Path, dest: Path, name: str) -> Path:
    """A Docker 25+ style `docker save` archive made from a (gzip) OCI layout.

    Like Docker 25: uncompressed layer blobs, index.json with the containerd name
    annotation, and a manifest.json whose Config and Layers point into blobs/sha256/.
    """
    work = dest.with_suffix(".layout")
    shutil.copytree(oci_layout, work)
    index, manifest = oci_manifest(work)
    layers = []
    for desc in manifest["layers"]:
        plain = gzip.decompress(oci_blob(work, desc["digest"]))
        digest = oci_put_blob(work, plain)
        (work / "blobs" / "sha256" / desc["digest"][7:]).unlink()
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": len(plain),
            }
        )
    manifest["layers"] = layers
    index["manifests"][0]["annotations"] = {
        "io.containerd.image.name": "docker.io/" + name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
    }
    oci_set_manifest(work, index, manifest)
    docker_manifest = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
            "RepoTags": [name],
            "Layers": ["blobs/sha256/" + d["digest"][7:] for d in layers],
        }
    ]
    (work / "manifest.json").write_text(json.dumps(docker_manifest))
    tar_dir(work, dest)
    shutil.rmtree(work)
    return dest

"""Start the real Docker daemon when none runs, and build a busybox base image.

No registry is reachable, so the base image is a `docker import` of a tree made
from Debian's static busybox and its applet links.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker

BASE_IMAGE = "layerfs-test/busybox:base"
BUSYBOX = "/bin/busybox"


def ensure_dockerd(timeout: float = 60.0) -> docker.DockerClient:
    """Return a client of a running dockerd, starting one (as root) if needed."""
    client = docker.from_env(timeout=300)
    try:
        client.ping()
        return client
    except Exception:
        pass
    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is not installed: apt-get install docker.io")
    log = open("/var/log/dockerd.log", "ab")  # noqa: SIM115 - handed to the daemon
    subprocess.Popen(
        ["dockerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.ping()
            return client
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"dockerd did not answer within {timeout:.0f} s (see /var/log/dockerd.log)")


def busybox_rootfs_tar() -> bytes:
    """A tar of a minimal root: /bin/busybox, applet symlinks, /etc, /tmp."""
    if not os.path.exists(BUSYBOX):
        raise RuntimeError("busybox is missing: apt-get install busybox-static")
    applets = subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            info.mtime = 1700000000
            tar.addfile(info)

        for d in ("bin", "etc", "root", "var", "usr", "usr/bin", "sbin", "dev", "proc", "sys"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        info = tar.gettarinfo(BUSYBOX, "bin/busybox")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        with open(BUSYBOX, "rb") as f:
            tar.addfile(info, f)
        for applet in sorted(set(applets)):
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            link.mtime = 1700000000
            tar.addfile(link)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ensure_busybox_image(client: docker.DockerClient, tag: str = BASE_IMAGE) -> str:
    """Import the busybox base image once; return its tag."""
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    subprocess.run(
        ["docker", "import", "-c", 'CMD ["/bin/sh"]', "-", tag],
        input=busybox_rootfs_tar(),
        check=True,
        capture_output=True,
    )
    return tag


def docker_build(context: Path, tag: str) -> None:
    """`docker build` with the classic builder (no BuildKit) and no network.

    No step needs one (there is no registry), and without it a build does not
    depend on the daemon's bridge.
    """
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    cmd = ["docker", "build", "-q", "--network", "none", "-t", tag, str(context)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"docker build of {tag} failed:\n{proc.stdout}\n{proc.stderr}")

"""A Debian bookworm minbase image in the local Docker daemon, built once with debootstrap.

No registry is reachable; debootstrap fetches from the mirror apt uses on this
machine. The image is kept in the daemon (tag DEBIAN_IMAGE), so later runs
reuse it; the tests and the benchmarks share it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

DEBIAN_IMAGE = "layerfs-test/debian:bookworm"


def debian_mirror(suite: str = "bookworm") -> str:
    """The mirror apt uses here for ``suite`` (deb822 .sources or one-line .list files)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in (".list", ".sources"):
            continue  # apt itself ignores other names (e.g. *.disabled)
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1) for line in stanza.splitlines() if ":" in line[:20]
                )
                if suite in fields.get("Suites", "").split() and "deb" in fields.get("Types", ""):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if words[:1] == ["deb"] and len(words) > 2 and words[2] == suite:
                    return words[1]
    return "http://deb.debian.org/debian"


def image_id(tag: str) -> str | None:
    """The daemon's ID of the image ``tag``, or None if it has none."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_debian_image(tag: str = DEBIAN_IMAGE) -> str:
    """`debootstrap --variant=minbase bookworm`, imported into the daemon as ``tag`` once."""
    if image_id(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed: apt-get install debootstrap")
    work = Path(tempfile.mkdtemp(prefix="layerfs-debootstrap-"))
    rootfs = work / "rootfs"
    try:
        _check(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()])
        _check(
            [
                "/bin/sh",
                "-c",
                f"tar --numeric-owner --xattrs -C {rootfs} -cf - . | docker import - {tag}",
            ]
        )
    finally:
        for sub in ("proc", "sys", "dev/pts", "dev"):
            subprocess.run(["umount", "-l", str(rootfs / sub)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return tag


def _check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {tail}")

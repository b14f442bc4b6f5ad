"""A record of each active layerfs mount, so commit/diff/umount can find its upper.

One JSON document per mount under ``backend.cache_dir()/mounts/``, named by the
mountpoint's absolute path (percent-encoded). It is written when the mount
answers and removed by the mount's own process once it is unmounted, so
`layerfs umount` needs neither the store nor its password. A record whose pid
is gone is stale (a killed daemon): its upper can still be committed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from layerfs.errors import LayerfsError
from layerfs.store.backend import Backend


@dataclass
class MountInfo:
    """One active mount: what it shows and where its changes go."""

    mountpoint: str
    image: str | None  # image name (None in overlay mode)
    image_id: str | None
    upper_dir: str | None  # image mode: DIR of --upper; overlay mode: the upperdir
    lowerdirs: list[str] = field(default_factory=list)  # overlay mode, top first
    pid: int = 0

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.pid > 0


def _dir(backend: Backend) -> Path:
    return backend.cache_dir() / "mounts"


def _file(backend: Backend, mountpoint: str | Path) -> Path:
    key = quote(os.path.abspath(mountpoint), safe="")
    return _dir(backend) / f"{key}.json"


def save_mountinfo(backend: Backend, info: MountInfo) -> None:
    """Record an active mount (atomically replacing an older record)."""
    path = _file(backend, info.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1) + "\n")
    os.replace(tmp, path)


def record_mount(
    backend: Backend,
    mountpoint: str | Path,
    pid: int,
    *,
    image: str | None = None,
    image_id: str | None = None,
    upper_dir: str | Path | None = None,
    lowerdirs: list[str] | None = None,
) -> MountInfo:
    """Save the record of a mount just made, with every path made absolute."""
    info = MountInfo(
        mountpoint=os.path.realpath(mountpoint),
        image=image,
        image_id=image_id,
        upper_dir=os.path.abspath(upper_dir) if upper_dir else None,
        lowerdirs=[os.path.abspath(p) for p in lowerdirs or []],
        pid=pid,
    )
    save_mountinfo(backend, info)
    return info


def load_mountinfo(backend: Backend, mountpoint: str | Path) -> MountInfo:
    """The record of the mount at ``mountpoint``; LayerfsError if there is none."""
    path = _file(backend, mountpoint)
    try:
        return MountInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise LayerfsError(
            f"no layerfs mount is recorded at {mountpoint}: mount it with layerfs mount"
        ) from None
    except (ValueError, TypeError) as exc:
        raise LayerfsError(f"the mount record of {mountpoint} is damaged ({exc})") from exc


def forget_mount(backend: Backend, mountpoint: str | Path, pid: int) -> None:
    """Remove the record of the mount at ``mountpoint`` if process ``pid`` served it
    (a newer mount at the same place keeps its own)."""
    path = _file(backend, os.path.realpath(mountpoint))
    try:
        if MountInfo(**json.loads(path.read_text())).pid == pid:
            path.unlink(missing_ok=True)
    except (OSError, ValueError, TypeError):
        return


def list_mountinfo(backend: Backend) -> list[MountInfo]:
    """Every recorded mount (alive or stale)."""
    out = []
    folder = _dir(backend)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            try:
                out.append(MountInfo(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
    return out

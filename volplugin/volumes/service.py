"""The volume operations behind the protocol: directories under the root plus their state.

Layout of the root:
    state.db, state.db-wal   the state database (see volplugin.volumes.state)
    volumes/NAME/            a volume's data, the mountpoint handed to containers
    trash/UUID/              volumes being removed (emptied again at start); named by a
                             uuid alone, so that any volume name fits (a name may be 255 bytes)
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker

from volplugin.errors import VolpluginError, VolumeExists, VolumeInUse, VolumeNotFound
from volplugin.times import now_iso
from volplugin.volumes import containers, options
from volplugin.volumes.diskusage import SizeCache, disk_usage
from volplugin.volumes.names import check_name
from volplugin.volumes.state import State, VolumeRecord

log = logging.getLogger("volplugin.volumes.service")

PATH_CACHE = 4096  # volume paths kept by VolumeService.path_of


Hook = Callable[[VolumeRecord, Path], None]


@dataclass
class Hooks:
    """Callbacks for features that act on volume life events (e.g. restore on first mount).

    A hook that raises a VolpluginError makes the request fail with its message.
    """

    on_create: list[Hook] = field(default_factory=list)
    on_first_mount: list[Hook] = field(default_factory=list)
    on_last_unmount: list[Hook] = field(default_factory=list)  # of managed volumes only
    # Checks before a Remove changes anything: one that raises (a VolpluginError) refuses it.
    before_remove: list[Callable[[VolumeRecord], None]] = field(default_factory=list)
    on_remove: list[Hook] = field(default_factory=list)  # before the directory goes
    status: list[Callable[[VolumeRecord], dict]] = field(default_factory=list)  # extra keys
    # Volumes (by their options) a feature manages, e.g. by swapping their directory
    # under the service lock: their Mount waits for that lock, their first Mount runs
    # on_first_mount and their last Unmount runs on_last_unmount.
    managed: list[Callable[[dict[str, str]], bool]] = field(default_factory=list)
    # Volumes known beyond this host (roaming volumes in a shared store): given a name
    # not recorded here, the options to record it with (None: unknown). Get, Mount and
    # Path of such a name record it here first, and so does a Create without options.
    known_elsewhere: list[Callable[[str], dict[str, str] | None]] = field(default_factory=list)
    # Right before a backup of the named volume is published: one that raises stops it
    # (nothing published); and once it is, with its record (a roaming volume's head).
    before_publish: list[Callable[[str], None]] = field(default_factory=list)
    published: list[Callable[[str, object], None]] = field(default_factory=list)
    # The backup the named volume's next backup is incremental against, if a feature
    # knows better than "this host's last one" (a roaming volume's head).
    backup_parent: list[Callable[[str], str | None]] = field(default_factory=list)
    # More (name, created) pairs for List: volumes known elsewhere, not recorded here.
    listed_elsewhere: list[Callable[[], list[tuple[str, str]]]] = field(default_factory=list)


class VolumeService:
    """Create, remove, mount and describe volumes of one driver under one root."""

    def __init__(
        self,
        root: Path,
        driver: str,
        state: State,
        *,
        docker_factory: Callable[[], docker.DockerClient] = containers.docker_client,
        hooks: Hooks | None = None,
        sizes: SizeCache | None = None,
        size_budget: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.driver = driver
        self.state = state
        self.docker_factory = docker_factory
        self.hooks = hooks or Hooks()
        # No cache and no budget: walk every volume fully (the CLI); else answer quickly.
        if sizes is None and size_budget is not None:
            sizes = SizeCache(budget=size_budget)
        self.sizes = sizes
        self.volumes_dir = self.root / "volumes"
        self.trash_dir = self.root / "trash"
        self.lock = threading.Lock()  # Create, Remove, Mount, Unmount: one at a time
        self._paths: dict[str, Path] = {}  # path_of's answers, by name
        self._plain: dict[str, dict[str, str]] = {}  # unmanaged volumes' options (see mount)
        # What Capabilities reports: "global" once a feature serves volumes known beyond
        # this host (roaming volumes), else "local".
        self.scope = "local"

    @classmethod
    def open(cls, root: Path, driver: str, **kw) -> VolumeService:
        """The service of `root`, made if new."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        (root / "volumes").mkdir(exist_ok=True)
        (root / "trash").mkdir(exist_ok=True)
        kw.setdefault("sizes", SizeCache())
        return cls(root, driver, State.under(root), **kw)

    def empty_trash(self) -> None:
        """Finish removals interrupted by a crash."""
        for entry in self.trash_dir.iterdir():
            shutil.rmtree(entry, ignore_errors=True)

    # -- paths ---------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        """The mountpoint of a volume; the name is validated so it stays under the root.

        Answers are kept (up to PATH_CACHE names): nearly every request asks, and
        pathlib's joins and checks are slow enough to show under load.
        """
        path = self._paths.get(name)
        if path is None:
            path = self.volumes_dir / check_name(name)
            if path.parent != self.volumes_dir:
                raise VolumeNotFound(f"volume name {name!r} does not map into the root")
            if len(self._paths) < PATH_CACHE:
                self._paths[name] = path
        return path

    def _record(self, name: str) -> VolumeRecord:
        record = self.state.get(check_name(name))
        if record is None:
            raise self._missing(name)
        return record

    def _elsewhere(self, name: str) -> dict[str, str] | None:
        """The options of a volume a feature knows beyond this host, None if none does."""
        for known in self.hooks.known_elsewhere:
            found = known(name)
            if found is not None:
                return found
        return None

    def adopt_known(self, name: str) -> bool:
        """Record here a volume known elsewhere (see Hooks.known_elsewhere); False if unknown.

        Call without the lock held: it creates the volume.
        """
        if not self.hooks.known_elsewhere or self.state.get(check_name(name)) is not None:
            return False
        found = self._elsewhere(name)
        if found is None:
            return False
        self.create(name, found)
        return True

    def _missing(self, name: str) -> VolumeNotFound:
        return VolumeNotFound(f"no such volume {name!r} in driver {self.driver}: create it first")

    # -- operations ----------------------------------------------------------------------

    def create(self, name: str, opts: dict | None, *, adopt: bool = False) -> VolumeRecord:
        """Record a volume and make its directory (``adopt``: its directory was made on
        purpose, e.g. restored, so taking it over is no surprise)."""
        path = self.path_of(name)
        if not opts and self.hooks.known_elsewhere and self.state.get(name) is None:
            opts = self._elsewhere(name) or opts  # `docker run -v NAME:...` on another host
        normal = options.normalize(opts)
        with self.lock:
            existing = self.state.get(name)
            if existing is not None:
                if existing.options != normal:
                    raise VolumeExists(
                        f"volume {name!r} already exists with options {_fmt(existing.options)}, "
                        f"not {_fmt(normal)}: use the same options or remove it first"
                    )
                return existing
            fresh = not path.exists()
            path.mkdir(mode=0o755, exist_ok=True)
            if not fresh and not adopt:
                log.warning("volume %s: adopting the existing directory %s", name, path)
            apply_root_options(path, normal, fresh)
            record = self.state.add(name, normal, now_iso())
            try:
                for hook in self.hooks.on_create:
                    hook(record, path)
            except BaseException:
                self.state.delete(name)  # a failed hook (e.g. from=) leaves no volume
                if fresh:
                    shutil.rmtree(path, ignore_errors=True)
                raise
            if self.hooks.on_create:
                apply_root_options(path, normal, False)  # given options win over hooks
            return record

    def remove(self, name: str) -> None:
        path = self.path_of(name)
        with self.lock:
            record = self._record(name)
            for check in self.hooks.before_remove:
                check(record)
            if record.mount_ids:
                self._refuse_if_used(record)
                self.state.clear_mounts(name)
            # Mount does not take the lock (see `mount`): the record goes first, in one
            # statement that fails if a container mounted the volume meanwhile.
            if not self.state.delete_unmounted(name):
                raise VolumeInUse(
                    f"volume {name!r} was mounted by a container while it was being "
                    "removed: stop that container first"
                )
            for hook in self.hooks.on_remove:
                hook(record, path)
            doomed = self.to_trash(name, path)
            if self.sizes:
                self.sizes.forget(str(path))
        shutil.rmtree(doomed, ignore_errors=True)

    def to_trash(self, name: str, path: Path) -> Path:
        """Move volume ``name``'s directory ``path`` into the trash (``trash/UUID``, whatever
        the name's length); return where it went, for the caller to delete outside the lock.

        If the move fails the directory is deleted in place: a volume whose record is
        gone must not leave data for the next Create of that name to adopt.
        """
        self.trash_dir.mkdir(exist_ok=True)
        doomed = self.trash_dir / uuid.uuid4().hex
        if path.exists():
            try:
                os.rename(path, doomed)
            except OSError as exc:
                log.warning("volume %s: cannot move it to the trash (%s)", name, exc)
                shutil.rmtree(path, ignore_errors=True)
        return doomed

    def _refuse_if_used(self, record: VolumeRecord) -> None:
        """Refuse removal while containers hold the volume; forget IDs nobody holds."""
        try:
            users = containers.containers_using(self.docker_factory(), record.name, self.driver)
        except docker.errors.DockerException as exc:
            raise VolumeInUse(
                f"volume {record.name!r} is mounted ({record.mount_count} mount(s)) and the "
                f"Docker daemon cannot be asked who uses it ({exc}): stop those containers first"
            ) from None
        if users:
            names = ", ".join(sorted(u.name for u in users))
            raise VolumeInUse(
                f"volume {record.name!r} is in use by container(s) {names}: "
                "stop or remove them first"
            )
        log.warning(
            "volume %s: forgetting %d stale mount ID(s); no running container uses it",
            record.name,
            record.mount_count,
        )

    def mount(self, name: str, mount_id: str) -> Path:
        """Count a mount of the volume; return its directory.

        A volume no feature manages (`Hooks.managed`) needs no lock: one statement
        records the ID, and Remove deletes the record only if it has no IDs. Its options
        are kept after its first Mount here, and that statement records the ID only
        while the volume still has them: the next Mount is that one statement. Managed
        volumes wait for the lock.
        """
        path = self.path_of(name)  # validates the name
        seen = self._plain.get(name)
        if seen is not None:
            if path.is_dir() and self.state.add_mount_while(name, mount_id, seen):
                return path
            self._plain.pop(name, None)
        # New to this process, a repeated ID, or the volume changed: read it.
        options = self.state.options(name)  # not the record: its IDs grow with the mounts
        if options is None and self.adopt_known(name):
            options = self.state.options(name)
        if options is None:
            raise self._missing(name)
        if self._managed(options):
            with self.lock:
                return self._mount_locked(name, mount_id, path)
        self._check_dir(name, path)
        if not self.state.add_mount(name, mount_id):
            raise self._missing(name)
        if len(self._plain) < PATH_CACHE:
            self._plain[name] = options
        return path

    def _managed(self, options: dict[str, str]) -> bool:
        return any(p(options) for p in self.hooks.managed)

    def _mount_locked(self, name: str, mount_id: str, path: Path) -> Path:
        record = self._record(name)  # again: it may have changed while we waited
        if not record.mount_ids and self.hooks.on_first_mount:
            for hook in self.hooks.on_first_mount:
                hook(record, path)
        self._check_dir(name, path)
        self.state.add_mount(name, mount_id)
        return path

    def _check_dir(self, name: str, path: Path) -> None:
        if not path.is_dir():
            raise VolpluginError(
                f"volume {name!r}: its directory {path} is missing; "
                "restore it from a backup or remove the volume"
            )

    def unmount(self, name: str, mount_id: str) -> None:
        """Forget a mount ID; a managed volume's last one runs its hooks under the lock."""
        path = self.path_of(name)  # validates the name
        seen = self._plain.get(name)
        if seen is not None and self.state.forget_mount_while(name, mount_id, seen):
            return  # an unmanaged volume: no hooks, so no count
        released = self.state.release_mount(name, mount_id)
        if released is None:
            raise self._missing(name)
        went, left = released
        if not (went and left == 0 and self.hooks.on_last_unmount):
            return
        with self.lock:
            record = self.state.get(name)
            if record is None or record.mount_ids or not self._managed(record.options):
                return  # removed, mounted again meanwhile, or no feature's business
            for hook in self.hooks.on_last_unmount:
                hook(record, path)

    def get(self, name: str) -> VolumeRecord:
        record = self.state.get(check_name(name))
        if record is None and self.adopt_known(name):
            record = self.state.get(name)
        if record is None:
            raise self._missing(name)
        return record

    def list(self) -> list[VolumeRecord]:
        return self.state.list()

    def describe(self, record: VolumeRecord) -> dict:
        """A volume as the protocol's Get shows it: as in `listing`, with its Status."""
        doc = self._summary(record.name, record.created)
        doc["Status"] = self._status(record, doc["Mountpoint"])
        return doc

    def listing(self) -> list[dict]:
        """Every volume as the protocol's List shows it: no Status, so no record is read."""
        names = self.state.names()
        if self.hooks.listed_elsewhere:
            here = {name for name, _ in names}
            for more in self.hooks.listed_elsewhere:
                names.extend(pair for pair in more() if pair[0] not in here)
            names.sort()
        return [self._summary(name, created) for name, created in names]

    def _summary(self, name: str, created: str) -> dict:
        return {"Name": name, "Mountpoint": str(self.path_of(name)), "CreatedAt": created}

    def _status(self, record: VolumeRecord, path: str) -> dict:
        usage = self.sizes.usage(path) if self.sizes else disk_usage(path, None)
        extra: dict = {}
        for hook in self.hooks.status:
            extra.update(hook(record))
        return {
            "Created": record.created,
            "Size": usage.human(),
            "SizeBytes": usage.bytes,
            "Containers": record.mount_count,
            "Options": dict(record.options),
            **extra,
        }


def apply_root_options(path: Path, opts: dict[str, str], fresh: bool) -> None:
    if fresh or "mode" in opts:
        os.chmod(path, int(opts.get("mode", "0755"), 8))
    if "uid" in opts or "gid" in opts:
        os.chown(path, int(opts.get("uid", "-1")), int(opts.get("gid", "-1")))


def _fmt(opts: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + "}" if opts else "{}"

"""The snapshots service containerd calls: snapshots, their directories and their mounts.

Under the snapshotter's ROOT (0700):

```
metadata.db                 every snapshot (layerfs.snapshotter.metadata)
snapshots/ID/fs             an active snapshot's upper directory (a view's: empty)
snapshots/ID/work           its overlay workdir
snapshots/ID/ro             a committed snapshot's chain, mounted read-only once used
snapshots/ID/commit         while committing: the upper over its parent, read-only
```

Mounts containerd gets: an active snapshot without parent is a bind of its
``fs``; with a parent it is a kernel overlay (source ``layerfs``) whose lower
layers are the parent chain's metadata tree and the store's content layers
(the same lowers as the parent's ``ro`` mount), ``fs`` its upper. A view is a
read-only bind of its parent's ``ro`` mount (or of an empty directory).
Commit stores the upper as a layer and removes it; the store itself is only
opened by helper processes (layerfs.snapshotter.storework for commits, pins
and unpins, layerfs.snapshotter.chainmount for chain mounts), so this
long-lived process keeps metadata and mounts only. None of these mounts
depends on this process: it can be killed or restarted while containers run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from layerfs.catalog import LayerRecord
from layerfs.errors import LayerfsError
from layerfs.fs.mounting import kernel_mounts
from layerfs.snapshotter.chains import SNAPSHOT_REF, is_unpack_key, unpacked_chain_id
from layerfs.snapshotter.metadata import (
    AlreadyExists,
    FailedPrecondition,
    Kind,
    Metadata,
    NotFound,
    Snapshot,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountSpec:
    """One mount as containerd's API carries it."""

    type: str
    source: str
    options: list[str]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class Snapshotter:
    """containerd's snapshotter operations over a ROOT directory and a layerfs store."""

    def __init__(self, root: Path, store_url: str) -> None:
        self.root = Path(os.path.abspath(root))
        self.store_url = store_url
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.meta = Metadata(self.root / "metadata.db")
        self._store_lock = threading.Lock()  # commits, removals and chain mounts, one at a time
        # mounts committed chains after their commit, one at a time
        self._mounter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain-mount")
        # removes committed snapshots' upper directories, after the Commit is answered
        self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upper-removal")
        # a store helper started when an unpack is prepared, for the commit that follows
        self._spare_lock = threading.Lock()
        self._spare: tuple[subprocess.Popen, float] | None = None

    def _holder(self, name: str) -> str:
        """The holder of the store pin that keeps the committed snapshot ``name``'s layer."""
        return f"containerd snapshot {name} (layerfs snapshotter {self.root})"

    def _unpin(self, pin_id: str) -> None:
        from layerfs.snapshotter.layers import store_work

        store_work(self.store_url, {"op": "unpin", "pin": pin_id})

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    def dir_of(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id)

    def close(self) -> None:
        self._mounter.shutdown(wait=True)
        self._remover.shutdown(wait=True)
        spare = self._take_spare()
        if spare is not None:
            spare.communicate(b"")  # it exits on an empty request
        self.meta.close()

    # -- store helpers started ahead ---------------------------------------------------
    def _ready_helper(self) -> None:
        """Start a store helper for the commit an unpack ends with, so that its imports
        and the store's opening happen while containerd applies the layer."""
        from layerfs.snapshotter.layers import start_store_helper

        with self._spare_lock:
            if self._spare is not None and self._spare[0].poll() is None:
                return
            self._spare = (start_store_helper(self.store_url), time.monotonic())

    def _take_spare(self) -> subprocess.Popen | None:
        """The helper started ahead, if it still waits (else None: start one)."""
        from layerfs.snapshotter.storework import SPARE_WAIT

        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        proc, since = spare
        if proc.poll() is None and time.monotonic() - since < SPARE_WAIT - 60:
            return proc
        if proc.poll() is None:
            proc.communicate(b"")
        return None

    # -- creating -------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        target = labels.get(SNAPSHOT_REF, "")
        if target:
            self._provide(parent, labels, target)  # AlreadyExists if the store holds it
        mounts = self._create(key, parent, labels, Kind.ACTIVE)
        if is_unpack_key(key):
            self._ready_helper()
        return mounts

    # -- layers the store already holds -----------------------------------------------
    def _provide(self, parent: str, labels: dict[str, str], target: str) -> None:
        """containerd's remote-snapshot protocol: a Prepare labelled
        ``containerd.io/snapshot.ref`` = CHAINID asks for the layer of that chain ID
        over ``parent``. If a committed snapshot already is that layer, or the store
        holds it (a layer of one of its images, or one committed here before), it is
        committed at once under the chain ID (pinned, no upper, nothing copied) and
        AlreadyExists is raised: containerd then finds it by its label and parent.
        Otherwise nothing happens and the layer is unpacked as usual."""
        from layerfs.snapshotter.layers import store_work

        for snap in self.meta.all():
            if (
                snap.kind is Kind.COMMITTED
                and snap.parent == parent
                and snap.labels.get(SNAPSHOT_REF) == target
            ):
                raise AlreadyExists(f"snapshot {target} already exists as {snap.key}")
        parent_chain = ""
        if parent:
            above = self.meta.find(parent)
            if above is None or above.kind is not Kind.COMMITTED or not above.chain_id:
                return  # the usual path answers (or unpacks over a parent of unknown chain)
            parent_chain = above.chain_id
        name = target if self.meta.find(target) is None else f"{target} over {parent or '-'}"
        with self._store_lock:
            if self.meta.find(name) is not None:
                return
            known = self._committed_layer(target, parent_chain)
            answer = store_work(
                self.store_url,
                {
                    "op": "provide",
                    "target": target,
                    "parent_chain": parent_chain,
                    "holder": self._holder(name),
                    "layer": asdict(known) if known is not None else None,
                },
            )
            if answer.get("layer") is None:
                return
            layer = LayerRecord(**answer["layer"])
            try:
                self.meta.add_committed(name, parent, labels, layer, answer["pin"], target)
            except BaseException:
                self._unpin(answer["pin"])
                raise
        log.info("snapshot %s: layer %s of the store, committed without unpacking", name, target)
        self._mounter.submit(self._mount_committed, name)
        raise AlreadyExists(f"snapshot {target} is held by the store: committed as {name}")

    def _committed_layer(self, target: str, parent_chain: str) -> LayerRecord | None:
        """The layer of chain ID ``target`` over ``parent_chain``, if committed here before
        (else the store helper looks among the store's images)."""
        chains = {s.key: s.chain_id for s in self.meta.all() if s.kind is Kind.COMMITTED}
        for snap in self.meta.all():
            if (
                snap.kind is Kind.COMMITTED
                and snap.chain_id == target
                and snap.layer is not None
                and chains.get(snap.parent, "") == parent_chain
            ):
                return snap.layer
        return None

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        return self._create(key, parent, labels, Kind.VIEW)

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: Kind) -> list[MountSpec]:
        snap = self.meta.create(key, parent, kind, labels)
        base = self.dir_of(snap)
        try:
            if base.exists():  # left by a snapshot whose removal was cut short
                self._remove_dir(base)
            base.mkdir(mode=0o755)
            (base / "fs").mkdir(mode=0o755)
            if kind is Kind.ACTIVE:
                (base / "work").mkdir(mode=0o700)
            return self._mounts(snap)
        except BaseException:
            self.meta.remove(key)
            self._remove_dir(base)
            raise

    # -- mounts ---------------------------------------------------------------------
    def mounts(self, key: str) -> list[MountSpec]:
        snap = self.meta.get(key)
        if snap.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: it has no mounts")
        return self._mounts(snap)

    def _mounts(self, snap: Snapshot) -> list[MountSpec]:
        from layerfs.fs.overlay import overlay_options

        base = self.dir_of(snap)
        if snap.kind is Kind.VIEW:
            source = self._chain_mount(snap.parent) if snap.parent else base / "fs"
            return [MountSpec("bind", str(source), ["ro", "rbind"])]
        if not snap.parent:
            return [MountSpec("bind", str(base / "fs"), ["rw", "rbind"])]
        view = self._chain_view(snap.parent)
        options = overlay_options(
            [Path(view.path)], view.data_layers, upper=base / "fs", work=base / "work"
        )
        return [MountSpec("overlay", "layerfs", options)]

    def _chain_mount(self, name: str) -> Path:
        """The read-only mount of the committed snapshot ``name``'s chain (made if needed)."""
        self._chain_view(name)
        return self.dir_of(self.meta.get(name)) / "ro"

    def _chain_view(self, name: str):  # -> ViewInfo
        from layerfs.snapshotter.layers import ensure_chain_mount, mounted_view

        chain = self.meta.chain(name)
        top = chain[-1]
        mountpoint = self.dir_of(top) / "ro"
        view = mounted_view(mountpoint)
        if view is not None:
            return view
        with self._store_lock:
            chain = self.meta.chain(name)  # again: a removal may have come first
            layers = [s.layer for s in chain if s.layer is not None]
            return ensure_chain_mount(self.store_url, chain[-1].key, layers, mountpoint)

    # -- commit ---------------------------------------------------------------------
    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        """Store the active snapshot ``key``'s upper as a layer (in a helper process) and
        record it as the committed snapshot ``name``. If the helper fails or is killed,
        nothing is recorded: ``key`` stays active with its upper, and a retry works."""
        from layerfs.fs.overlay import mount_overlay, umount
        from layerfs.snapshotter.layers import ensure_chain_mount, store_work

        chain_id = unpacked_chain_id(name, key, labels)
        with self._store_lock:
            snap = self.meta.check_committable(key, name)
            base = self.dir_of(snap)
            upper = base / "fs"
            lowers: list[LayerRecord] = []
            mountpoint = upper
            mounted = False
            if snap.parent:
                chain = self.meta.chain(snap.parent)
                lowers = [s.layer for s in chain if s.layer is not None]
                view = ensure_chain_mount(
                    self.store_url, chain[-1].key, lowers, self.dir_of(chain[-1]) / "ro"
                )
                mountpoint = base / "commit"
                mountpoint.mkdir(mode=0o700, exist_ok=True)
                # the upper over its lowers, read-only: what the snapshot shows
                mount_overlay(mountpoint, [upper, Path(view.path)], view.data_layers)
                mounted = True
            try:
                answer = store_work(
                    self.store_url,
                    {
                        "op": "commit",
                        "upper": str(upper),
                        "mountpoint": str(mountpoint),
                        "lowers": [asdict(layer) for layer in lowers],
                        "holder": self._holder(name),
                        "chain_id": chain_id,
                    },
                    self._take_spare(),
                )
            finally:
                if mounted:
                    umount(str(mountpoint))
                    mountpoint.rmdir()
            layer, pin_id = LayerRecord(**answer["layer"]), answer["pin"]
            try:
                done = self.meta.commit(snap, name, labels, layer, pin_id, chain_id)
            except BaseException:
                self._unpin(pin_id)
                raise
        # the layer is in the store now: its upper goes after the answer (Cleanup also
        # removes what a stop cut short)
        self._remover.submit(_remove_upper, base)
        self._mounter.submit(self._mount_committed, name)
        return done

    def _mount_committed(self, name: str) -> None:
        """Mount a newly committed chain (its index, metadata tree and ``ro`` mount) right
        after its commit, in the background, so that its first container starts as fast
        as the next ones (a Prepare over it meanwhile waits for it). A failure here only
        leaves that work to the first use."""
        started = time.monotonic()
        try:
            if self.meta.children(name):
                return  # a chain above it is mounted instead (or was, by a Prepare over it)
            self._chain_view(name)
        except NotFound:
            return  # removed meanwhile
        except (LayerfsError, OSError) as exc:
            log.warning("snapshot %s is mounted on first use instead: %s", name, exc)
            return
        log.info("snapshot %s: chain mounted in %.2f s", name, time.monotonic() - started)

    # -- removal --------------------------------------------------------------------
    def remove(self, key: str) -> None:
        from layerfs.snapshotter.layers import unmount_chain

        with self._store_lock:
            snap = self.meta.remove(key)
            base = self.dir_of(snap)
            if snap.kind is Kind.COMMITTED:
                unmount_chain(base / "ro")
                if snap.pin:
                    self._unpin(snap.pin)
            self._remove_dir(base)

    def _remove_dir(self, path: Path) -> None:
        """Remove a snapshot's directory; never while anything is mounted below it."""
        prefix = f"{path}/"
        busy = [m.mountpoint for m in kernel_mounts() if m.mountpoint.startswith(prefix)]
        if busy:
            log.warning("not removing %s yet: %s is mounted (Cleanup retries)", path, busy[0])
            return
        shutil.rmtree(path, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove what no snapshot uses: directories of removed snapshots, and the upper
        and work directories left in committed ones."""
        from layerfs.snapshotter.layers import unmount_chain

        with self._store_lock:
            known = {str(s.id): s for s in self.meta.all()}
            for entry in sorted(os.listdir(self.snapshots_dir)):
                path = self.snapshots_dir / entry
                snap = known.get(entry)
                if snap is None:
                    unmount_chain(path / "ro")
                    self._remove_dir(path)
                elif snap.kind is Kind.COMMITTED:
                    for part in ("fs", "work"):
                        shutil.rmtree(path / part, ignore_errors=True)

    # -- information ----------------------------------------------------------------
    def stat(self, key: str) -> Snapshot:
        return self.meta.get(key)

    def usage(self, key: str) -> Usage:
        snap = self.meta.get(key)
        if snap.kind is Kind.COMMITTED:
            layer = snap.layer
            return Usage(layer.apparent_size, layer.entries) if layer else Usage(0, 0)
        if snap.kind is Kind.VIEW:
            return Usage(0, 0)
        return disk_usage(self.dir_of(snap) / "fs")

    def list(self, filters: list[str]) -> list[Snapshot]:
        from layerfs.snapshotter.filters import parse_filters

        match = parse_filters(filters)
        return [s for s in self.meta.all() if match(s)]


def _remove_upper(base: Path) -> None:
    """Remove a committed snapshot's upper and work directories."""
    for part in ("fs", "work"):
        shutil.rmtree(base / part, ignore_errors=True)


def disk_usage(path: Path) -> Usage:
    """Blocks and inodes below ``path`` (hard links counted once), as containerd's du does."""
    if not path.is_dir():
        raise NotFound(f"{path} is gone")
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            size += st.st_blocks * 512
    return Usage(size, len(seen))

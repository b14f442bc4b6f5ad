"""Lazy restore: `-o from=BACKUP -o lazy=true` gives a volume that is usable at once.

At Create the backup's tree is indexed and mounted writable by layerfs' mount service
(a kernel overlay over the tree's image view, see volplugin.lazy.mount) on the volume's
own directory ROOT/volumes/NAME, so Mount and Path answer as for any volume and
containers see the backup at once: file content is fetched from the store on first read
and cached locally, and the kernel keeps writes in an upper tree. Meanwhile a
background thread fills ROOT/lazy/NAME/fill with the whole backup (volplugin.lazy.fill);
Status shows the progress under ``Lazy``.

The switch. When the fill is complete and no container holds the volume (at once, or
at the last Unmount), the mount is released and the upper tree is merged onto the
filled directory (volplugin.lazy.merge), which then replaces the volume's directory:
from then on the volume is an ordinary one, with every write made through the mount.
While containers hold the mount, new Mounts get the mount too, so every container of
a volume always sees the same tree; the switch waits for the last of them.

Durability. The fill syncs what it wrote before it records it and before the volume
is marked filled (volplugin.lazy.fill); the merge can be redone after a crash and syncs
before it returns (its state and the upper tree stay until the filled directory is in
place), and the renames that put the filled directory in place are synced before the
volume is marked done.

Prune. From Create until the switch is over (or the volume is removed) the backup's
tree is pinned in the store (layerfs.maintenance.pins; the pin is taken under the
store's shared lock in the same hold that found the backup, and its id is kept in the
lazy state), so neither a prune nor the volume's own ``backup-keep`` removes data the
mount and the fill still read, even if the backup itself is forgotten meanwhile.

Restarts. Phases and progress are in the state database (volplugin.lazy.state). The
overlay is the kernel's and its image view a daemon in its own session: both outlive
the plugin; at start the plugin remounts only a mount that is gone or whose view died,
restarts unfinished fills (which skip what is already local) and redoes an interrupted
switch; pins that outlived their volume or its switch are removed. A volume made by an
earlier version, whose changes are in the retired FUSE engine's format, is left as it
is, with an error in its Status (volplugin.lazy.mount.check_layout).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from layerfs import confined
from layerfs.errors import LayerfsError
from layerfs.fs.views import unhold_view
from layerfs.maintenance.pins import pin, unpin
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import default_store_url, open_store
from volplugin.backup.docs import get_backup
from volplugin.errors import BadOption, VolpluginError
from volplugin.lazy.fill import RATE_ENV, Filler, Progress, parse_rate
from volplugin.lazy.merge import merge_upper
from volplugin.lazy.mount import (
    LazyDirs,
    LegacyLayout,
    check_layout,
    force_release,
    is_mounted,
    mount,
    prepare,
    ready,
    release,
)
from volplugin.lazy.state import LazyRecord, LazyState
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord

log = logging.getLogger("volplugin.lazy.volumes")

RETRY_SECONDS = 5.0
WATCH_SECONDS = 1.0  # how often the main process looks for fills to start
FILL_NICE = 10  # the fill threads' scheduling priority (Linux: per thread)


class LazyError(VolpluginError):
    """A lazy volume cannot be created, served or switched."""


def is_lazy(options: dict[str, str]) -> bool:
    """Whether a volume may be served lazily: made with lazy=true, or a roaming volume
    (served from its head after another host wrote it; see volplugin.roaming)."""
    return options.get("lazy") == "true" or options.get("roaming") == "true"


@dataclass
class _Fill:
    thread: threading.Thread
    stop: threading.Event


class LazyVolumes:
    """The lazy volumes of one VolumeService: hooks, fills and switches."""

    def __init__(
        self,
        service: VolumeService,
        store_url: str | None = None,
        rate: int | None = None,
        *,
        background: bool = True,
    ) -> None:
        self.service = service
        self.store_url = store_url or default_store_url()
        self.rate = parse_rate(os.environ.get(RATE_ENV)) if rate is None else rate
        self.state = LazyState(service.state.path)
        self.background = background
        self._fills: dict[str, _Fill] = {}
        self._fills_lock = threading.Lock()
        self._closed = threading.Event()
        self._unpin_tried: dict[str, float] = {}
        self._creating: set[str] = set()  # mounts being made: their fill starts once they serve
        self._held_view: Path | None = None  # the cache dir of the view this process holds

    @classmethod
    def attach(
        cls, service: VolumeService, store_url: str | None = None, *, background: bool = True
    ) -> LazyVolumes:
        """Install the hooks on ``service``.

        With ``background`` (the main server process) this process runs the fills: it
        resumes the lazy volumes of the root now and, every `WATCH_SECONDS`, starts the
        fills of volumes that another worker process created. Without it (the other
        worker processes) hooks only create, switch and remove.
        """
        lazy = cls(service, store_url, background=background)
        hooks = service.hooks
        hooks.on_create.append(lazy.on_create)
        hooks.on_last_unmount.append(lazy.on_last_unmount)
        hooks.on_remove.append(lazy.on_remove)
        hooks.status.append(lazy.status)
        hooks.managed.append(is_lazy)  # the switch swaps the directory under the lock
        if background:
            lazy.resume()
            threading.Thread(target=lazy._watch, name="lazy-watch", daemon=True).start()
        return lazy

    def _watch(self) -> None:
        """Start the fills of volumes whose lazy restore another process created."""
        while not self._closed.wait(WATCH_SECONDS):
            try:
                records = {lazy.name: lazy for lazy in self.state.list()}
                for name, fill in list(self._fills.items()):
                    if name not in records:  # removed through another process
                        fill.stop.set()
                for lazy in records.values():
                    if lazy.phase == "filling" and lazy.name not in self._creating:
                        self._start_fill(lazy.name)
                    elif lazy.phase == "done" and lazy.pin is not None:
                        self._retry_unpin(lazy.name, lazy.pin)
            except Exception:  # keep watching; the next round retries
                log.exception("cannot look for new lazy volumes")

    def keep_view_ready(self, cache_dir: Path) -> None:
        """Have the store's image view daemon serve for as long as this process lives, so
        that lazy mounts are made here at once (volplugin.lazy.mount.ready); ``close``
        lets it go. Failures are only logged: mounts then start the daemon themselves."""
        try:
            ready(self.store_url, os.getpid())
        except (LayerfsError, OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot start the store's image view ahead of mounts: %s", exc)
            return
        self._held_view = cache_dir
        import layerfs.fs.service  # noqa: F401 - what a lazy mount runs, loaded ahead of it

        log.info("the store's image view serves ahead of lazy mounts")

    def close(self) -> None:
        """Stop the fills (they resume at the next start); the mounts keep serving."""
        self._closed.set()
        if self._held_view is not None:
            unhold_view(self._held_view, os.getpid())
        for fill in list(self._fills.values()):
            fill.stop.set()
        for fill in list(self._fills.values()):
            fill.thread.join(timeout=10)
        self.state.close()

    def dirs(self, name: str) -> LazyDirs:
        return LazyDirs(self.service.root / "lazy" / name)

    # -- hooks (called with the service lock held) ---------------------------------------

    def replace_lazily(self, name: str, ref: str, path: Path, store: ChunkStore) -> None:
        """Serve backup ``ref`` of the open ``store`` lazily in place of volume ``name``'s
        directory ``path`` (with the service lock held): what was there goes to the trash."""
        self._discard(name, path)
        doomed = self.service.to_trash(name, path)
        path.mkdir(mode=0o755)
        try:
            self._create(name, ref, path, store)
        except BaseException:
            self._discard(name, path)
            raise
        finally:
            shutil.rmtree(doomed, ignore_errors=True)

    def on_create(self, record: VolumeRecord, path: Path) -> None:
        if record.options.get("lazy") != "true":
            return
        try:
            self._create(record.name, record.options["from"], path)
        except BaseException as exc:
            self._discard(record.name, path)
            self.service.state.delete(record.name)
            if isinstance(exc, VolpluginError):
                raise
            if isinstance(exc, LayerfsError | OSError):
                raise LazyError(
                    f"cannot create the lazy volume {record.name!r} from backup "
                    f"{record.options['from']}: {exc}"
                ) from exc
            raise

    def on_last_unmount(self, record: VolumeRecord, path: Path) -> None:
        if not is_lazy(record.options):  # as in `status`: skip the query
            return
        lazy = self.state.get(record.name)
        if lazy is not None and lazy.phase == "filled":
            self._switch_locked(record.name)

    def on_remove(self, record: VolumeRecord, path: Path) -> None:
        if self.state.get(record.name) is None:
            return
        self._discard(record.name, path)

    def status(self, record: VolumeRecord) -> dict:
        if not is_lazy(record.options):  # only lazy volumes have lazy state: skip the query
            return {}
        lazy = self.state.get(record.name)
        return {"Lazy": lazy.to_status()} if lazy is not None else {}

    # -- create, resume, remove ----------------------------------------------------------

    def _create(self, name: str, ref: str, path: Path, given: ChunkStore | None = None) -> None:
        if any(path.iterdir()):
            raise BadOption(
                f"volume directory {path} is not empty: a lazy restore needs a new volume"
            )
        self._creating.add(name)
        try:
            self._create_mount(name, ref, path, given)
        finally:
            self._creating.discard(name)
        log.info("volume %s: serving backup %s lazily; filling in the background", name, ref)
        self._start_fill(name)

    def _create_mount(self, name: str, ref: str, path: Path, given: ChunkStore | None) -> None:
        store = given or open_store(self.store_url)
        try:
            backend = store.backend
            with backend.lock(exclusive=False):  # no prune between the look-up and the pin
                backup = get_backup(backend, ref)
                dirs = self.dirs(name)
                # reads every entry, checked: a bad tree is refused before anything is made
                totals = Filler(store, backup.tree, dirs.fill).progress
                held = pin(backend, backup.tree, f"lazy volume {name} from backup {backup.id}")
                self.state.add(name, backup.id, backup.tree, held.id)  # on_remove unpins
            if dirs.base.exists():
                shutil.rmtree(dirs.base)  # leftovers of a create that crashed
            prepare(store, dirs, backup.tree)
            self.state.set_progress(name, 0, totals.files_total, 0, totals.bytes_total)
            mount(self.store_url, dirs, path, name, backup.tree, store)
        finally:
            if given is None:
                store.backend.close()

    def _discard(self, name: str, path: Path) -> None:
        """Stop the fill, release the mount, drop the lazy parts of a volume."""
        fill = self._fills.pop(name, None)
        if fill is not None:
            fill.stop.set()
            fill.thread.join(timeout=30)
        force_release(path)
        shutil.rmtree(self.dirs(name).base, ignore_errors=True)
        lazy = self.state.get(name)
        if lazy is not None and lazy.pin is not None:
            self._unpin(name, lazy.pin)
        self.state.delete(name)

    def _unpin(self, name: str, pin_id: str) -> bool:
        """Remove the pin on the volume's backup tree; False (logged) if the store says no."""
        try:
            store = open_store(self.store_url)
            try:
                unpin(store.backend, pin_id)
            finally:
                store.backend.close()
        except (LayerfsError, OSError) as exc:
            log.error(
                "volume %s: cannot remove its pin %s on the backup's tree (%s): prune keeps "
                "that tree until the pin document pins/%s.json is removed",
                name,
                pin_id,
                exc,
                pin_id,
            )
            return False
        self.state.set_pin(name, None)
        return True

    def _retry_unpin(self, name: str, pin_id: str) -> None:
        """Unpin a switched volume whose unpin failed, at most every RETRY_SECONDS."""
        now = time.monotonic()
        if now - self._unpin_tried.get(name, -RETRY_SECONDS) < RETRY_SECONDS:
            return
        self._unpin_tried[name] = now
        if self._unpin(name, pin_id):
            self._unpin_tried.pop(name, None)

    def resume(self) -> None:
        """At start: remount, restart fills, finish switches; forget rows of gone volumes."""
        for lazy in self.state.list():
            name = lazy.name
            if self.service.state.get(name) is None:
                shutil.rmtree(self.dirs(name).base, ignore_errors=True)
                if lazy.pin is not None:
                    self._unpin(name, lazy.pin)
                self.state.delete(name)
                continue
            if lazy.phase == "done" and lazy.pin is not None:
                self._unpin(name, lazy.pin)  # the switch ended before its unpin
                continue
            try:
                self._resume(lazy)
            except LegacyLayout as exc:
                log.error("volume %s: %s", name, exc)
                self.state.set_error(name, str(exc))
            except (LayerfsError, OSError) as exc:
                log.error("volume %s: cannot resume the lazy restore: %s", name, exc)
                self.state.set_error(name, f"{exc}; restart the plugin to retry")

    def _resume(self, lazy: LazyRecord) -> None:
        path = self.service.path_of(lazy.name)
        if lazy.pin is None and lazy.phase in ("filling", "filled", "switching"):
            try:
                self._pin_again(lazy)
            except (LayerfsError, OSError) as exc:  # serve what is local and cached anyway
                log.warning("volume %s: cannot pin its backup's tree: %s", lazy.name, exc)
        if lazy.phase in ("filling", "filled"):
            check_layout(self.dirs(lazy.name), lazy.name)
            if not is_mounted(path):
                log.warning("volume %s: its lazy mount is gone; mounting it again", lazy.name)
                mount(self.store_url, self.dirs(lazy.name), path, lazy.name, lazy.tree)
            self._start_fill(lazy.name)
        elif lazy.phase == "switching":
            with self.service.lock:
                self._switch_locked(lazy.name)

    def _pin_again(self, lazy: LazyRecord) -> None:
        """Pin the tree of a lazy volume made by a version without pins (if it is still there)."""
        store = open_store(self.store_url)
        try:
            backend = store.backend
            with backend.lock(exclusive=False):
                store.get_record(lazy.tree)  # raises if a prune took it already
                held = pin(backend, lazy.tree, f"lazy volume {lazy.name} from backup {lazy.backup}")
                self.state.set_pin(lazy.name, held.id)
        finally:
            store.backend.close()

    # -- fill ----------------------------------------------------------------------------

    def _start_fill(self, name: str) -> None:
        """Start the fill of ``name`` unless one runs already in this process."""
        if not self.background or self._closed.is_set():
            return  # the main server process starts it (see `_watch`)
        with self._fills_lock:
            running = self._fills.get(name)
            if running is not None and running.thread.is_alive():
                return
            stop = threading.Event()
            thread = threading.Thread(
                target=self._fill_loop, args=(name, stop), name=f"lazy-fill-{name}", daemon=True
            )
            self._fills[name] = _Fill(thread, stop)
            thread.start()

    def _fill_loop(self, name: str, stop: threading.Event) -> None:
        try:  # a background copy: the containers' own reads (and the view) go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILL_NICE)
        except OSError as exc:
            log.debug("cannot lower the priority of the fill of %s: %s", name, exc)
        while not stop.is_set() and not self._closed.is_set():
            lazy = self.state.get(name)
            if lazy is None:
                return
            try:
                if lazy.phase == "filling":
                    if not self._fill(lazy, stop):
                        return
                    self.state.set_phase(name, "filled")
                    log.info("volume %s: everything is local", name)
                if self._try_switch(name, stop):
                    return
            except (LayerfsError, OSError) as exc:
                log.error("volume %s: lazy fill failed (%s); retrying", name, exc)
                self.state.set_error(name, f"{exc}; retrying every {RETRY_SECONDS:.0f} s")
            except sqlite3.ProgrammingError:
                if self._closed.is_set():  # closed under a step that outlived close's wait:
                    return  # the next start redoes the step (the state says where it was)
                raise
            stop.wait(RETRY_SECONDS)

    def _fill(self, lazy: LazyRecord, stop: threading.Event) -> bool:
        def report(p: Progress) -> None:
            self.state.set_progress(
                lazy.name, p.files_done, p.files_total, p.bytes_done, p.bytes_total
            )

        store = open_store(self.store_url)
        try:
            filler = Filler(
                store,
                lazy.tree,
                self.dirs(lazy.name).fill,
                journal=self.state.journal(lazy.name),
                rate=self.rate,
                stop=stop,
                on_progress=report,
            )
            done = filler.run()
        finally:
            store.backend.close()
        if done:
            self.state.set_error(lazy.name, None)
        return done

    # -- switch --------------------------------------------------------------------------

    def _try_switch(self, name: str, stop: threading.Event) -> bool:
        """Switch if no container holds the volume; True when nothing is left to do here."""
        lock = self.service.lock
        while not lock.acquire(timeout=0.5):
            if stop.is_set():
                return True
        try:
            return self._switch_locked(name)
        finally:
            lock.release()

    def _switch_locked(self, name: str) -> bool:
        """The switch (see the module docstring); False if the mount is still busy."""
        record = self.service.state.get(name)
        lazy = self.state.get(name)
        if record is None or lazy is None or lazy.phase not in ("filled", "switching"):
            return True
        if record.mount_ids:
            log.info("volume %s: filled; switching when its containers let go", name)
            return True
        path = self.service.path_of(name)
        dirs = self.dirs(name)
        try:
            check_layout(dirs, name)
        except LegacyLayout as exc:
            log.error("volume %s: cannot switch: %s", name, exc)
            self.state.set_error(name, str(exc))
            return True
        if not release(path):
            log.warning("volume %s: the lazy mount is busy; switching later", name)
            return False
        self.state.set_phase(name, "switching")
        if dirs.fill.exists():
            self._merge(name, dirs)  # synced when it returns
            old = dirs.base / "old"
            if old.exists():
                shutil.rmtree(old)
            if path.exists():
                os.rename(path, old)
            os.rename(dirs.fill, path)
        # the renames (maybe of a run that was stopped), before the upper tree goes
        confined.syncfs_dir(path)
        shutil.rmtree(dirs.base, ignore_errors=True)
        if self.service.sizes:
            self.service.sizes.forget(str(path))
        self.state.set_phase(name, "done")
        self.state.forget_filled(name)
        self._fills.pop(name, None)
        log.info("volume %s: switched to its local directory", name)
        if lazy.pin is not None:
            self._unpin(name, lazy.pin)  # on failure `_watch` and the next start retry
        return True

    def _merge(self, name: str, dirs: LazyDirs) -> None:
        applied = merge_upper(dirs.upper, dirs.fill, dirs.stage)
        log.info("volume %s: merged %d changed entries made during the lazy phase", name, applied)

"""Roaming volumes: `-o roaming=true` volumes that follow their service from host to host.

A roaming volume's identity is its record in the shared store (volplugin.roaming.registry),
so every plugin serving that store lists it and records it locally when the daemon asks
for it (Hooks.known_elsewhere). One host at a time writes it:

* First Mount here: take the volume's lease (volplugin.roaming.lease; with ``wait``, try
  until then), and unless the local directory already holds the head (this host handed
  it over last), serve the head backup lazily in its place (volplugin.lazy.volumes):
  usable at once, filled in the background. Taking over a lease that expired (its host
  died without handing over) is logged with what was lost (the head's age), and noted
  for `volplugin inspect`.
* While mounted the lease is renewed; every backup of the volume is fenced by it
  (Hooks.before_publish) and, once published, becomes the volume's head under it
  (Hooks.published). ``checkpoint-interval`` backs it up that often in the background.
* Last Unmount here: the handover, a final incremental backup published as the head,
  then the lease is released. A handover that fails keeps the lease and is retried.
* Lease lost (this process was stopped past the period, the store unreachable, the
  record taken over): nothing more is published for the volume, and the containers that
  use it are stopped, or with ``on-lease-loss=readonly`` the volume's own mount (a
  lazily served volume's overlay) is made read-only; a volume that is a plain directory
  cannot be made read-only under a running container, so its containers are stopped.

Remove deletes the volume's record from the store (its backups stay), unless another
host holds it.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from layerfs.errors import LayerfsError, StoreError
from layerfs.store.backend import Backend
from layerfs.store.chunks import ChunkStore
from layerfs.store.location import default_store_url, open_backend
from layerfs.store.s3 import env_lease_ttl
from volplugin.backup import tasks
from volplugin.backup.docs import delete_backup
from volplugin.errors import BadOption, VolpluginError, VolumeExists, VolumeInUse
from volplugin.hostid import host_id
from volplugin.jobs.runner import JobRunner
from volplugin.jobs.table import JobBusy
from volplugin.lazy.volumes import LazyVolumes
from volplugin.roaming.lease import HeldElsewhere, LeaseLost, Leases, Taken, holder_text, take
from volplugin.roaming.registry import Found, Head, Holder, Registry, RoamingRecord
from volplugin.roaming.state import RoamingState
from volplugin.times import iso_at
from volplugin.volumes import containers
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord

log = logging.getLogger("volplugin.roaming")

LIST_CACHE = 5.0  # seconds List reuses the store's list of roaming volumes
WAIT_POLL = 1.0  # seconds between tries of a Mount that waits for another host
RETRY_SECONDS = 30.0  # between tries of a handover that failed
WATCH_SECONDS = 1.0  # how often checkpoints and pending handovers are looked at


def is_roaming(options: dict[str, str]) -> bool:
    return options.get("roaming") == "true"


def supports_roaming(store_url: str) -> bool:
    """Whether a store can hold roaming volumes: one shared by hosts, with conditional
    writes (S3)."""
    return store_url.startswith("s3://")


class RoamingVolumes:
    """The roaming volumes of one VolumeService: hooks, leases, handovers, checkpoints."""

    def __init__(
        self,
        service: VolumeService,
        store_url: str,
        jobs: JobRunner,
        lazy: LazyVolumes,
        *,
        backend: Callable[[], Backend] | None = None,
    ) -> None:
        self.service = service
        self.store_url = store_url
        self.jobs = jobs
        self.lazy = lazy
        self.host = host_id()
        self.state = RoamingState(service.state.path)
        self._backend_factory = backend or (lambda: open_backend(store_url))
        self._registry: Registry | None = None
        self._backend_lock = threading.Lock()
        self.leases = Leases(self.registry, self._on_lost)
        self._listed: tuple[float, list[tuple[str, str]]] = (-LIST_CACHE, [])
        self._pending: dict[str, float] = {}  # handovers to retry: name -> next try
        self._checkpoints: dict[str, float] = {}  # name -> monotonic time of the last one
        self._closed = threading.Event()
        self._lost: dict[str, str] = {}  # leases this host lost, until it takes one again

    @classmethod
    def attach(
        cls, service: VolumeService, store_url: str | None, jobs: JobRunner, lazy: LazyVolumes
    ) -> RoamingVolumes | None:
        """Install the hooks when the store can hold roaming volumes (else None: a Create
        with ``roaming=true`` is refused by `refuse` instead)."""
        url = store_url or default_store_url()
        if not supports_roaming(url):
            service.hooks.on_create.append(_refuse(url))
            return None
        roaming = cls(service, url, jobs, lazy)
        hooks = service.hooks
        hooks.managed.append(is_roaming)
        hooks.known_elsewhere.append(roaming.known_elsewhere)
        hooks.listed_elsewhere.append(roaming.listed_elsewhere)
        hooks.on_create.append(roaming.on_create)
        hooks.on_first_mount.append(roaming.on_first_mount)
        hooks.on_last_unmount.insert(0, roaming.on_last_unmount)  # before a lazy switch
        hooks.before_remove.append(roaming.before_remove)
        hooks.on_remove.append(roaming.on_remove)
        hooks.status.append(roaming.status)
        hooks.before_publish.append(roaming.before_publish)
        hooks.published.append(roaming.published)
        hooks.backup_parent.append(roaming.backup_parent)
        service.scope = "global"
        threading.Thread(target=roaming._resume, name="roaming-resume", daemon=True).start()
        threading.Thread(target=roaming._watch, name="roaming-watch", daemon=True).start()
        return roaming

    def _resume(self) -> None:
        """At start: keep the leases this host still holds, act on those it lost while the
        plugin was down (its containers still use the volume), hand over what is unmounted;
        then have the store open and its image view serving before the first Mount asks."""
        for record in self.service.state.list():
            if not is_roaming(record.options):
                continue
            try:
                self._resume_one(record)
            except (LayerfsError, OSError) as exc:
                log.error(
                    "roaming volume %s: cannot check its lease at start: %s", record.name, exc
                )
        try:
            cache_dir = self.registry().backend.cache_dir()
        except (LayerfsError, OSError) as exc:  # opened again at first use
            log.warning("cannot open the store ahead of requests: %s", exc)
            return
        if not self._closed.is_set():
            self.lazy.keep_view_ready(cache_dir)

    def _resume_one(self, record: VolumeRecord) -> None:
        name = record.name
        local = self.state.get(name)
        if local.generation is None:
            return
        found = self.registry().get(name)
        live = found.live_holder if found is not None else None
        ours = live is not None and live.host == self.host and live.generation == local.generation
        if ours and found is not None:
            sent = time.monotonic()
            renewed = self.registry().replace(found, found.record)
            if renewed is not None:
                self.leases.hold(name, Taken(renewed, sent, None))
                log.info(
                    "roaming volume %s: still held here (generation %d)", name, live.generation
                )
                if not record.mount_ids:
                    self._pending[name] = time.monotonic()  # hand it over now
                else:
                    self._checkpoints[name] = time.monotonic()
                return
        self.state.set_generation(name, None)
        if record.mount_ids:
            now = holder_text(found) if found is not None else "nobody (removed from the store)"
            self._on_lost(
                name,
                f"lost while the plugin was down (generation {local.generation}); held by {now}",
            )

    def close(self) -> None:
        """Stop renewing: held leases expire by themselves (a restart takes them again)."""
        self._closed.set()
        self.leases.close()
        if self._registry is not None:
            self._registry.backend.close()
        self.state.close()

    def registry(self) -> Registry:
        """The store's roaming records, through one backend opened at first use."""
        with self._backend_lock:
            if self._registry is None:
                self._registry = Registry(self._backend_factory())
            return self._registry

    def _found(self, name: str) -> Found:
        found = self.registry().get(name)
        if found is None:
            raise VolpluginError(
                f"roaming volume {name!r} is not in the store {self.store_url} any more "
                "(removed from another host?): remove it here too"
            )
        return found

    # -- names known elsewhere ------------------------------------------------------------

    def known_elsewhere(self, name: str) -> dict[str, str] | None:
        try:
            found = self.registry().get(name)
        except StoreError as exc:  # unreachable: answer as if unknown (a damaged one raises)
            log.warning("cannot look roaming volume %s up in the store: %s", name, exc)
            return None
        return dict(found.record.options) if found is not None else None

    def listed_elsewhere(self) -> list[tuple[str, str]]:
        when, names = self._listed
        if time.monotonic() - when < LIST_CACHE:
            return names
        try:
            names = [(f.record.name, f.record.created) for f in self.registry().all()]
        except LayerfsError as exc:
            log.warning("cannot list the roaming volumes of the store: %s", exc)
            return names
        self._listed = (time.monotonic(), names)
        return names

    # -- hooks (with the service lock held) -----------------------------------------------

    def on_create(self, record: VolumeRecord, path: Path) -> None:
        if not is_roaming(record.options):
            return
        new = RoamingRecord(record.name, dict(record.options), record.created, env_lease_ttl())
        registry = self.registry()
        if registry.create(new) is not None:
            log.info("roaming volume %s: created in the store %s", record.name, self.store_url)
            self._listed = (-LIST_CACHE, [])
            return
        found = self._found(record.name)
        if found.record.options != record.options:
            raise VolumeExists(
                f"roaming volume {record.name!r} exists in the store with options "
                f"{found.record.options}, not {record.options}: use the same options "
                "(or none, to take the store's)"
            )

    def on_first_mount(self, record: VolumeRecord, path: Path) -> None:
        if not is_roaming(record.options):
            return
        name = record.name
        taken = self._take(name, float(record.options.get("wait", "0")))
        self.leases.hold(name, taken)
        self._lost.pop(name, None)
        self.state.set_generation(name, taken.found.record.generation)
        self._checkpoints[name] = time.monotonic()
        try:
            self._bring_up_to_head(name, path, taken.found)
        except BaseException:
            self._give_back(name)
            raise
        if taken.expired is not None:
            self._note_takeover(name, taken.expired, taken.found.record.head)

    def _take(self, name: str, wait: float) -> Taken:
        deadline = time.monotonic() + wait
        while True:
            try:
                return take(self.registry(), name, self.host)
            except HeldElsewhere:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(WAIT_POLL)

    def _bring_up_to_head(self, name: str, path: Path, found: Found) -> None:
        head = found.record.head
        local = self.state.get(name)
        if head is None or local.synced == head.backup:
            return  # new, or this host published the head from this directory
        log.info(
            "roaming volume %s: serving head backup %s (by host %s at %s) lazily",
            name,
            head.backup,
            head.host,
            iso_at(head.time),
        )
        self.lazy.replace_lazily(name, head.backup, path, ChunkStore(self.registry().backend))
        self.state.set_synced(name, head.backup)

    def _note_takeover(self, name: str, expired: Holder, head: Head | None) -> None:
        if head is None:
            lost = "it had published no backup: the volume starts empty here"
        else:
            age = max(0.0, time.time() - head.time)
            lost = (
                f"taken from its last head, backup {head.backup} of {iso_at(head.time)} "
                f"({age:.0f} s old): anything written there after it is lost"
            )
        text = (
            f"{iso_at(time.time())}: took over from host {expired.host}, whose lease "
            f"(generation {expired.generation}) expired without a handover; {lost}"
        )
        log.warning("roaming volume %s: %s", name, text)
        self.state.note(name, text)

    def on_last_unmount(self, record: VolumeRecord, path: Path) -> None:
        if not is_roaming(record.options) or self.leases.generation(record.name) is None:
            return
        self._handover(record.name)

    def _handover(self, name: str) -> bool:
        """Back up, publish the head and release the lease; False (retried later) on failure."""
        if self.leases.lost_reason(name):
            self.leases.forget(name)  # nothing may be published: the loss is noted already
            return True
        try:
            self._back_up(name, "handover")
            self.leases.release(name)
            self.state.set_generation(name, None)
        except LeaseLost as exc:
            self.leases.forget(name)
            self.state.note(name, f"{iso_at(time.time())}: handover not published: {exc}")
            log.error("roaming volume %s: handover not published: %s", name, exc)
            return True
        except (LayerfsError, OSError) as exc:
            log.error(
                "roaming volume %s: handover failed (the lease is kept; retrying in %.0f s): %s",
                name,
                RETRY_SECONDS,
                exc,
            )
            self._pending[name] = time.monotonic() + RETRY_SECONDS
            return False
        self._pending.pop(name, None)
        self._checkpoints.pop(name, None)
        log.info("roaming volume %s: handed over (head published, lease released)", name)
        return True

    def _back_up(self, name: str, trigger: str) -> None:
        """A backup job of ``name`` run to its end (after any job the volume has)."""
        body = tasks.backup_job(self.service, self.store_url, name, trigger=trigger)
        while True:
            try:
                job = self.jobs.submit("backup", name, body, {"Volume": name, "Trigger": trigger})
                break
            except JobBusy:
                for other in self.jobs.table.active(name):
                    self.jobs.wait(other.id)
        job = self.jobs.wait(job.id)
        if job.state != "succeeded":
            raise VolpluginError(f"the {trigger} backup (job {job.id}) {job.state}: {job.error}")

    def _give_back(self, name: str) -> None:
        try:
            self.leases.release(name)
        except (LayerfsError, OSError) as exc:
            log.warning("roaming volume %s: cannot release its lease: %s", name, exc)
            self.leases.forget(name)

    def before_remove(self, record: VolumeRecord) -> None:
        if not is_roaming(record.options):
            return
        found = self.registry().get(record.name)
        live = found.live_holder if found is not None else None
        if live is not None and live.host != self.host:
            raise VolumeInUse(
                f"roaming volume {record.name!r} is held by {holder_text(found)}: "
                "remove it there, or after its lease expires"
            )

    def on_remove(self, record: VolumeRecord, path: Path) -> None:
        if not is_roaming(record.options):
            return
        name = record.name
        self.leases.forget(name)
        found = self.registry().get(name)
        if found is not None:
            self.registry().delete(name)
            head = found.record.head
            log.info(
                "roaming volume %s: removed from the store%s",
                name,
                f"; its last head is backup {head.backup} (-o from={head.backup} brings it back)"
                if head
                else "",
            )
        self.state.delete(name)
        self._listed = (-LIST_CACHE, [])

    def status(self, record: VolumeRecord) -> dict:
        if not is_roaming(record.options):
            return {}
        name = record.name
        doc: dict = {"Host": self.host, "Notes": self.state.get(name).notes}
        lost = self.lost_reason(name)
        doc["Lease"] = (
            f"lost: {lost}" if lost else "held" if self.leases.holds(name) else "not held here"
        )
        try:
            found = self.registry().get(name)
        except LayerfsError as exc:
            doc["Error"] = f"cannot read the store's record: {exc}"
            return {"Roaming": doc}
        if found is None:
            doc["Error"] = "not in the store any more (removed from another host?)"
            return {"Roaming": doc}
        live = found.live_holder
        doc["Holder"] = live.host if live else None
        doc["HolderSince"] = iso_at(live.since) if live else None
        doc["Generation"] = found.record.generation
        head = found.record.head
        doc["Head"] = (
            {
                "Backup": head.backup,
                "Time": iso_at(head.time),
                "AgeSeconds": round(max(0.0, time.time() - head.time)),
                "Host": head.host,
                "Generation": head.generation,
            }
            if head
            else None
        )
        return {"Roaming": doc}

    # -- publishing under the lease -------------------------------------------------------

    def before_publish(self, name: str) -> None:
        options = self.service.state.options(name) or {}
        if not is_roaming(options):
            return
        if self.leases.generation(name) is None:
            lost = self._lost.get(name)
            raise LeaseLost(
                f"this host lost the lease of roaming volume {name!r} ({lost}): nothing of it "
                "is published from here any more"
                if lost
                else f"this host does not hold the lease of roaming volume {name!r}: back it "
                "up on the host whose containers use it"
            )
        self.leases.check(name)

    def backup_parent(self, name: str) -> str | None:
        """The head: what this host started from (restored, maybe from another host)."""
        options = self.service.state.options(name) or {}
        if not is_roaming(options):
            return None
        found = self.registry().get(name)
        head = found.record.head if found is not None else None
        return head.backup if head is not None else None

    def published(self, name: str, backup) -> None:  # noqa: ANN001 - a BackupRecord
        options = self.service.state.options(name) or {}
        if not is_roaming(options):
            return
        generation = self.leases.generation(name) or 0
        try:
            self.leases.publish_head(name, Head(backup.id, backup.time, self.host, generation))
        except LeaseLost:
            registry = self.registry()
            delete_backup(registry.backend, backup.id)  # never left behind as if published
            raise
        self.state.set_synced(name, backup.id)

    # -- losing the lease -----------------------------------------------------------------

    def lost_reason(self, name: str) -> str | None:
        """Why this host lost the volume's lease, until it takes the lease again."""
        return self.leases.lost_reason(name) or self._lost.get(name)

    def _on_lost(self, name: str, why: str) -> None:
        self._lost[name] = why
        self.state.note(name, f"{iso_at(time.time())}: this host lost the lease: {why}")
        record = self.service.state.get(name)
        if record is None or not record.mount_ids:
            return
        path = self.service.path_of(name)
        if record.options.get("on-lease-loss") == "readonly" and _remount_readonly(path):
            log.error("roaming volume %s: lease lost; its mount is now read-only", name)
            return
        self._stop_users(name)

    def _stop_users(self, name: str) -> None:
        try:
            client = containers.docker_client(timeout=60)
            users = containers.containers_using(client, name, self.service.driver)
            for user in users:
                log.error("roaming volume %s: lease lost; stopping container %s", name, user.name)
                client.api.stop(user.id, timeout=10)
        except Exception as exc:
            log.error("roaming volume %s: cannot stop its containers: %s", name, exc)

    # -- background: pending handovers, checkpoints --------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_SECONDS):
            try:
                self._retry_handovers()
                self._checkpoint_due()
            except Exception:
                log.exception("roaming volumes: background round failed")

    def _retry_handovers(self) -> None:
        now = time.monotonic()
        for name, when in list(self._pending.items()):
            if when > now:
                continue
            with self.service.lock:
                record = self.service.state.get(name)
                if record is None or record.mount_ids:
                    self._pending.pop(name, None)  # removed, or mounted here again
                    continue
                self._handover(name)

    def _checkpoint_due(self) -> None:
        for name, last in list(self._checkpoints.items()):
            options = self.service.state.options(name) or {}
            interval = options.get("checkpoint-interval")
            if interval is None or not self.leases.holds(name):
                continue
            if time.monotonic() - last < float(interval):
                continue
            self._checkpoints[name] = time.monotonic()
            body = tasks.backup_job(self.service, self.store_url, name, trigger="checkpoint")
            try:
                self.jobs.submit("backup", name, body, {"Volume": name, "Trigger": "checkpoint"})
            except JobBusy:
                continue  # a backup runs already: it is as good as a checkpoint


def _refuse(url: str) -> Callable[[VolumeRecord, Path], None]:
    def refuse(record: VolumeRecord, path: Path) -> None:
        if is_roaming(record.options):
            raise BadOption(
                f"roaming volumes need a store that hosts share (s3://...); this plugin's "
                f"store is {url}"
            )

    return refuse


def _remount_readonly(path: Path) -> bool:
    """Make the volume's own mount read-only for every container; False if it is no mount
    of its own or the kernel refuses (files open for writing)."""
    if not path.is_mount():
        return False
    done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("cannot make %s read-only: %s", path, done.stderr.strip())
        return False
    return True

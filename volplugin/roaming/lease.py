"""Roaming volumes' leases: taking one, keeping it, publishing under it, losing it.

A host takes a volume's lease by replacing its record (volplugin.roaming.registry) with
one that names it as holder under the next generation, if no other host's lease is
live. It keeps the lease by rewriting the record every ttl/4, each write conditional on
the version it wrote last: a write that fails because the record changed means that
another host took the volume over.

Fencing, as for the store's own lease (layerfs.store.leases): the holder counts its
lease as good until ``ttl`` seconds after it *sent* its last successful write, which
is before the store stamped it, so the holder gives up before any other host may
take over, whatever the hosts' clocks say. ``check`` must pass right before anything
is published for the volume (a backup document): it fails unless a third of the
period is left. A lease that went a whole period without a successful write (the
process was stopped, the store unreachable) is lost for good, and so is one whose
record changed under it: nothing is published under it again, and ``on_lost`` tells
the plugin, which stops writes to the volume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from volplugin.errors import VolpluginError, VolumeNotFound
from volplugin.roaming.registry import Found, Head, Holder, Registry
from volplugin.times import iso_at

log = logging.getLogger("volplugin.roaming.lease")

MARGIN = 1 / 3  # the share of the period a lease must still have for a publish


class HeldElsewhere(VolpluginError):
    """Another host holds the volume's lease."""


class LeaseLost(VolpluginError):
    """This host no longer holds the volume's lease: nothing may be published under it."""


def holder_text(found: Found) -> str:
    """Who holds a volume and since when, for messages."""
    holder = found.record.holder
    if holder is None:
        return "nobody"
    return (
        f"host {holder.host} (since {iso_at(holder.since)}, generation {holder.generation}, "
        f"renewed {found.age:.0f} s ago, lease period {found.record.ttl:.0f} s)"
    )


@dataclass(frozen=True)
class Taken:
    """A lease just taken: the record written, and the expired holder it replaced."""

    found: Found
    sent: float  # monotonic time the take was sent
    expired: Holder | None  # another host's lease that had expired, if any


def take(registry: Registry, name: str, host: str) -> Taken:
    """Take volume ``name``'s lease for ``host`` (HeldElsewhere if another host's is live)."""
    while True:
        found = registry.get(name)
        if found is None:
            raise VolumeNotFound(
                f"roaming volume {name!r} is not in the store any more (removed from another "
                "host?): remove it here too"
            )
        live = found.live_holder
        if live is not None and live.host != host:
            raise HeldElsewhere(
                f"roaming volume {name!r} is held by {holder_text(found)}: stop its "
                f"containers there first, or mount with -o wait=DURATION to wait for it"
            )
        old = found.record.holder
        generation = found.record.generation + 1
        record = replace(
            found.record, generation=generation, holder=Holder(host, time.time(), generation)
        )
        sent = time.monotonic()
        written = registry.replace(found, record)
        if written is not None:
            expired = old if old is not None and old.host != host and live is None else None
            return Taken(written, sent, expired)
        # another host changed the record meanwhile: look again


@dataclass
class _Held:
    found: Found  # the version we wrote last
    sent: float  # when that write was sent (monotonic)
    lost: str = ""


class Leases:
    """The roaming leases this plugin holds, kept alive by a thread; see the module doc."""

    def __init__(
        self,
        registry: Callable[[], Registry],
        on_lost: Callable[[str, str], None],
        *,
        tick: float | None = None,
    ) -> None:
        self._registry = registry
        self._on_lost = on_lost
        self._tick = tick
        self._held: dict[str, _Held] = {}
        self._mutex = threading.Lock()
        # One conditional write at a time: a renewal racing a publish would make one of
        # them fail on the version the other just wrote, as if the lease had been lost.
        self._writing = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when the set of leases changes
        self._thread: threading.Thread | None = None

    def hold(self, name: str, taken: Taken) -> None:
        with self._mutex:
            self._held[name] = _Held(taken.found, taken.sent)
            self._wake.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="roaming-leases", daemon=True
                )
                self._thread.start()

    def holds(self, name: str) -> bool:
        with self._mutex:
            held = self._held.get(name)
        return held is not None and not self._lapsed(name, held)

    def generation(self, name: str) -> int | None:
        with self._mutex:
            held = self._held.get(name)
        return held.found.record.generation if held is not None else None

    def lost_reason(self, name: str) -> str:
        with self._mutex:
            held = self._held.get(name)
        return held.lost if held is not None else ""

    def close(self) -> None:
        """Stop renewing (the leases expire by themselves; see `release` for a handover)."""
        self._stop.set()
        self._wake.set()

    # -- keeping --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._mutex:
                held = dict(self._held)
            ttls = [h.found.record.ttl for h in held.values()]
            woken = self._wake.wait(self._tick or (min(ttls) / 4 if ttls else None))
            self._wake.clear()
            if self._stop.is_set():
                return
            if woken:
                continue  # a lease taken (just written) or given up: the period may change
            for name, h in held.items():
                if h.lost or self._lapsed(name, h):
                    continue
                try:
                    self._renew(name, h)
                except Exception as exc:  # the store is away: keep trying until the lease lapses
                    log.warning("roaming volume %s: cannot renew its lease: %s", name, exc)

    def _renew(self, name: str, h: _Held) -> None:
        with self._writing:
            self._renew_locked(name, h)

    def _renew_locked(self, name: str, h: _Held) -> None:
        if h.lost:
            return
        sent = time.monotonic()
        written = self._registry().replace(h.found, h.found.record)
        with self._mutex:
            if self._held.get(name) is not h:
                return  # released meanwhile
            if written is None:
                self._lose(name, h, "another host changed its record: it was taken over")
                return
            h.found = written
            if not self._lapsed(name, h):  # it reached the store before it lapsed
                h.sent = sent

    def _lapsed(self, name: str, h: _Held) -> bool:
        if h.lost:
            return True
        age = time.monotonic() - h.sent
        if age >= h.found.record.ttl:
            self._lose(
                name,
                h,
                f"not renewed for {age:.0f} s, longer than its {h.found.record.ttl:.0f} s period "
                "(was this process stopped, or the store unreachable?)",
            )
            return True
        return False

    def _lose(self, name: str, h: _Held, why: str) -> None:
        if h.lost:
            return
        h.lost = why
        log.error("roaming volume %s: lease lost: %s", name, why)
        threading.Thread(
            target=self._on_lost, args=(name, why), name="roaming-lost", daemon=True
        ).start()

    def check(self, name: str, margin: float = MARGIN) -> None:
        """Raise LeaseLost unless the lease on ``name`` is sure to last ``margin`` of its period."""
        with self._mutex:
            h = self._held.get(name)
        if h is None:
            raise LeaseLost(f"this host does not hold the lease of roaming volume {name!r}")
        if self._lapsed(name, h):
            raise LeaseLost(f"the lease of roaming volume {name!r} was lost: {h.lost}")
        ttl = h.found.record.ttl
        left = ttl - (time.monotonic() - h.sent)
        if left < ttl * margin:
            raise LeaseLost(
                f"the lease of roaming volume {name!r} has {left:.1f} s of {ttl:.0f} s left "
                "(is the store slow or unreachable?)"
            )

    # -- changing the record under the lease ---------------------------------------------

    def _change(self, name: str, change: Callable[[Found], Found | None]) -> Found:
        with self._writing:
            return self._change_locked(name, change)

    def _change_locked(self, name: str, change: Callable[[Found], Found | None]) -> Found:
        self.check(name)
        with self._mutex:
            h = self._held[name]
        written = change(h.found)
        with self._mutex:
            if written is None:
                self._lose(name, h, "another host changed its record: it was taken over")
                raise LeaseLost(
                    f"roaming volume {name!r} was taken over by another host: nothing published"
                )
            h.found = written
        return written

    def publish_head(self, name: str, head: Head) -> Found:
        """Make ``head`` the volume's head, under the lease (LeaseLost if it is gone)."""
        registry = self._registry()
        return self._change(
            name, lambda found: registry.replace(found, replace(found.record, head=head))
        )

    def release(self, name: str) -> None:
        """Give the lease up (after a handover): the record names no holder any more."""
        registry = self._registry()
        with self._writing:
            self._change_locked(
                name, lambda found: registry.replace(found, replace(found.record, holder=None))
            )
            with self._mutex:
                self._held.pop(name, None)

    def forget(self, name: str) -> None:
        """Stop renewing ``name`` without touching its record (it expires by itself)."""
        with self._mutex:
            self._held.pop(name, None)

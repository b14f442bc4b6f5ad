"""What an operator does with roaming volumes across hosts: list them, break a lease.

`listing` describes every roaming volume of the store (who holds it, whether that
host's lease expired, the head backup and its age, whether this host knows it).
`break_lease` makes a volume's record name no holder, so that any host can mount it at
once: for a host that died, or one that must give the volume up. It is a conditional
replace of the version read (retried when a renewal wins the race); the old holder is
fenced by that, since its next renewal, conditional on the version it wrote, fails and
it reports the loss (volplugin.roaming.lease). It is refused on the holder itself while
containers here use the volume, and (given ``generation``) when the lease changed hands
since the operator looked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from layerfs.errors import LayerfsError
from volplugin.errors import VolpluginError, VolumeInUse, VolumeNotFound
from volplugin.roaming.registry import Found, Head, Holder
from volplugin.roaming.volumes import RoamingVolumes
from volplugin.times import iso_at

log = logging.getLogger("volplugin.roaming.operations")

RACE_TRIES = 10  # conditional replaces a break tries before giving up


class LeaseChanged(VolpluginError):
    """The lease an operator meant to break is not the volume's lease any more."""


def store_failure(action: str, exc: LayerfsError) -> VolpluginError:
    """A store error as a one-line error of the operation (plugin errors stay as they are)."""
    if isinstance(exc, VolpluginError):
        return exc
    return VolpluginError(f"cannot {action}: the store fails: {exc}")


def head_doc(head: Head | None, now: float) -> dict | None:
    if head is None:
        return None
    return {
        "Backup": head.backup,
        "Time": iso_at(head.time),
        "AgeSeconds": round(max(0.0, now - head.time)),
        "Host": head.host,
        "Generation": head.generation,
    }


def describe(roaming: RoamingVolumes, found: Found, now: float) -> dict:
    """One roaming volume for /Roaming.List."""
    record = found.record
    name = record.name
    holder, live = record.holder, found.live_holder
    local = roaming.service.state.options(name) is not None
    return {
        "Name": name,
        "Holder": live.host if live else None,
        "HolderSince": iso_at(holder.since) if holder else None,
        "LeaseExpired": holder is not None and live is None,
        "ExpiredHolder": holder.host if holder is not None and live is None else None,
        "Generation": record.generation,
        "Head": head_doc(record.head, now),
        "Local": local,
        "HeldHere": roaming.leases.holds(name),
        "LostHere": roaming.lost_reason(name),
    }


def listing(roaming: RoamingVolumes) -> list[dict]:
    """Every roaming volume of the store, by name."""
    try:
        found = roaming.registry().all()
    except LayerfsError as exc:
        raise store_failure("list the roaming volumes", exc) from exc
    now = time.time()
    return [describe(roaming, f, now) for f in found]


@dataclass(frozen=True)
class Broken:
    """A lease an operator broke: whose, and whether it had expired already."""

    name: str
    holder: Holder
    expired: bool

    def to_json(self) -> dict:
        return {
            "Host": self.holder.host,
            "Since": iso_at(self.holder.since),
            "Generation": self.holder.generation,
            "Expired": self.expired,
        }


def break_lease(roaming: RoamingVolumes, name: str, generation: int | None = None) -> Broken | None:
    """Make volume ``name``'s record name no holder; None if it named none already.

    With ``generation``, only the lease of that generation is broken (LeaseChanged if the
    volume changed hands since). Refused (VolumeInUse) when this host holds it and
    containers here use it. Runs under the service lock, so no Mount here slips in.
    """
    service = roaming.service
    with service.lock:
        try:
            broken = _replace_holder(roaming, name, generation)
        except LayerfsError as exc:
            raise store_failure(f"break the lease of roaming volume {name!r}", exc) from exc
    if broken is None:
        return None
    text = (
        f"{iso_at(time.time())}: lease of host {broken.holder.host} (generation "
        f"{broken.holder.generation}{', expired' if broken.expired else ''}) broken by an "
        f"operator on host {roaming.host}"
    )
    log.warning("roaming volume %s: %s", name, text)
    roaming.state.note(name, text)
    return broken


def _replace_holder(roaming: RoamingVolumes, name: str, generation: int | None) -> Broken | None:
    registry = roaming.registry()
    for _ in range(RACE_TRIES):
        found = registry.get(name)
        if found is None:
            raise VolumeNotFound(f"no roaming volume {name!r} in the store {roaming.store_url}")
        holder = found.record.holder
        if generation is not None and found.record.generation != generation:
            raise LeaseChanged(
                f"roaming volume {name!r} is at lease generation {found.record.generation}, "
                f"not {generation}: it changed hands meanwhile; look again "
                "(`volplugin ls --all-hosts`)"
            )
        if holder is None:
            return None
        if holder.host == roaming.host:
            _refuse_if_used_here(roaming, name)
        expired = found.live_holder is None
        if registry.replace(found, replace(found.record, holder=None)) is not None:
            return Broken(name, holder, expired)
        # a renewal (or a take) changed the record meanwhile: read it again
    raise VolpluginError(
        f"cannot break the lease of roaming volume {name!r}: its record changed at each of "
        f"{RACE_TRIES} tries; try again"
    )


def _refuse_if_used_here(roaming: RoamingVolumes, name: str) -> None:
    record = roaming.service.state.get(name)
    if record is not None and record.mount_ids:
        raise VolumeInUse(
            f"roaming volume {name!r} is held by this host ({roaming.host}) and "
            f"{record.mount_count} container mount(s) here use it: stop them (their last "
            "Unmount hands it over), rather than break the lease"
        )

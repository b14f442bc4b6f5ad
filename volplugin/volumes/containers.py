"""Which containers use a volume, asked of the Docker daemon through the docker SDK.

Only container listings are used (never inspect): a listing reads the daemon's snapshot
without taking container locks, so it is safe to call while the daemon waits on us.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import docker

# States in which a container holds its volumes mounted.
HOLDING_STATES = frozenset({"running", "paused"})


@dataclass(frozen=True)
class ContainerRef:
    """A container as the listing shows it."""

    id: str
    name: str
    state: str
    labels: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def holds_mounts(self) -> bool:
        return self.state in HOLDING_STATES


def docker_client(timeout: float = 10.0) -> docker.DockerClient:
    """A client for the daemon of DOCKER_HOST (default: the local socket)."""
    return docker.from_env(timeout=timeout)


def users_by_volume(
    client: docker.DockerClient, driver: str, *, holding_only: bool = True
) -> dict[str, list[ContainerRef]]:
    """Map each volume of `driver` to the containers that use it."""
    result: dict[str, list[ContainerRef]] = {}
    for item in client.api.containers(all=True):
        ref = _ref(item)
        if holding_only and not ref.holds_mounts:
            continue
        for mount in item.get("Mounts") or []:
            if mount.get("Type") == "volume" and mount.get("Driver") == driver:
                result.setdefault(mount.get("Name", ""), []).append(ref)
    return result


def containers_using(
    client: docker.DockerClient, volume: str, driver: str, *, holding_only: bool = True
) -> list[ContainerRef]:
    """The containers that use `volume` of `driver` (by default only those holding it)."""
    refs = []
    for item in client.api.containers(all=True, filters={"volume": volume}):
        ref = _ref(item)
        if holding_only and not ref.holds_mounts:
            continue
        if any(
            m.get("Type") == "volume" and m.get("Name") == volume and m.get("Driver") == driver
            for m in item.get("Mounts") or []
        ):
            refs.append(ref)
    return refs


def _ref(item: dict) -> ContainerRef:
    names = item.get("Names") or [item.get("Id", "")[:12]]
    return ContainerRef(
        id=item.get("Id", ""),
        name=names[0].lstrip("/"),
        state=item.get("State", ""),
        labels=dict(item.get("Labels") or {}),
    )

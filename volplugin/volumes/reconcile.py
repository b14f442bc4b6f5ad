"""Bring recorded mount IDs in line with the containers the daemon actually runs.

The daemon never replays Mount calls after a plugin restart, and mount IDs are not
container IDs. So at start we count, per volume, the running or paused containers whose
Mounts name that volume with our driver, and keep at most that many of the IDs recorded
before the count was taken: IDs of containers that died while we were down stop pinning
the volume. When the daemon cannot be reached the IDs are kept (nothing is released on
a guess) and the reconciliation is retried in the background.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import docker

from volplugin.volumes import containers
from volplugin.volumes.service import VolumeService

log = logging.getLogger("volplugin.volumes.reconcile")


@dataclass
class ReconcileReport:
    """What one reconciliation did: IDs dropped per volume."""

    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.dropped.values())


def reconcile(service: VolumeService, client: docker.DockerClient) -> ReconcileReport:
    """Drop mount IDs that no running container can account for."""
    snapshot = service.state.mount_snapshot()
    report = ReconcileReport()
    if not snapshot:
        return report
    users = containers.users_by_volume(client, service.driver)
    for volume, ids in snapshot.items():
        live = len(users.get(volume, []))
        dropped = service.state.adopt(volume, ids, live)
        if dropped:
            report.dropped[volume] = dropped
            log.warning(
                "volume %s: dropped %d stale mount ID(s); %d running container(s) use it",
                volume,
                dropped,
                live,
            )
    return report


def try_reconcile(service: VolumeService) -> bool:
    """One attempt; False when the daemon could not be asked."""
    try:
        reconcile(service, service.docker_factory())
    except docker.errors.DockerException as exc:
        log.warning("cannot reach the Docker daemon to reconcile mount IDs (%s); will retry", exc)
        return False
    return True


def reconcile_in_background(
    service: VolumeService, stop: threading.Event, interval: float = 5.0
) -> threading.Thread:
    """Retry reconciliation until it succeeds once or `stop` is set."""

    def run() -> None:
        while not stop.wait(interval):
            if try_reconcile(service):
                log.info("reconciled mount IDs with the Docker daemon")
                return

    thread = threading.Thread(target=run, name="volplugin-reconcile", daemon=True)
    thread.start()
    return thread

"""The job part of a volume's Status: its queued or running job (or null), under `Job`.

`attach` adds it to a VolumeService's status hooks, so VolumeDriver.Get (`docker volume
inspect`) shows it; one indexed query of the jobs table, so Get stays fast.
"""

from __future__ import annotations

from volplugin.jobs.table import JobTable
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord


def attach(volumes: VolumeService, table: JobTable) -> VolumeService:
    """Show each volume's queued or running job in its Status."""

    def status(record: VolumeRecord) -> dict:
        active = table.active(record.name)
        return {"Job": active[0].to_json() if active else None}

    volumes.hooks.status.append(status)
    return volumes

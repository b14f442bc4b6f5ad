"""A volume's jobs seen from the volumes core: its queued or running job in its Status
(under `Job`, or null), and no Remove while it has one.

`attach` adds both to a VolumeService's hooks, so VolumeDriver.Get (`docker volume
inspect`) shows the job (one indexed query of the jobs table, so Get stays fast) and
VolumeDriver.Remove (`docker volume rm`) is refused with the job's busy message.
"""

from __future__ import annotations

from volplugin.errors import VolumeInUse
from volplugin.jobs.table import JobTable, busy_message
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import VolumeRecord


def attach(volumes: VolumeService, table: JobTable) -> VolumeService:
    """Show each volume's queued or running job in its Status."""

    def status(record: VolumeRecord) -> dict:
        active = table.active(record.name)
        return {"Job": active[0].to_json() if active else None}

    def before_remove(record: VolumeRecord) -> None:
        active = table.active(record.name)
        if active:
            raise VolumeInUse(f"cannot remove it: {busy_message(active[0])}")

    volumes.hooks.status.append(status)
    volumes.hooks.before_remove.append(before_remove)
    return volumes

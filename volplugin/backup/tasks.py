"""The backup feature's jobs: what a backup, a restore and a prune job does when it runs.

Each function returns a job body (volplugin/jobs/runner.py): it opens the store, does the
work with the job's progress reporting, cancel check and quiesce journal, and returns the
job's Result, the payload the endpoints answered when they ran synchronously
({"Backup": ...}, {"Restore": ...}, {"Prune": ...}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from layerfs.errors import LayerfsError
from layerfs.store.location import open_store
from volplugin.backup import runner, service, volumes
from volplugin.backup.retention import Policy
from volplugin.jobs.runner import Body, JobContext
from volplugin.volumes.service import VolumeService


def backup_job(
    svc: VolumeService,
    store_url: str | None,
    volume: str,
    tags: Sequence[str] = (),
    *,
    trigger: str,
    keep: Policy | None = None,
    run: Callable[..., object] = runner.run_backup,
) -> Body:
    """A backup of `volume` with its consistency hooks (backup/runner.py run_backup)."""

    def body(ctx: JobContext) -> dict:
        try:
            store = open_store(store_url)
        except LayerfsError as exc:  # before any hook: nothing was stopped; inspect shows it
            volumes.record_outcome(svc, volume, None, str(exc), trigger=trigger, hooks=[])
            raise
        try:
            record = run(
                svc,
                store,
                volume,
                list(tags),
                trigger=trigger,
                keep=keep,
                journal=ctx.journal,
                check=ctx.check,
                progress=ctx.progress,
            )
        finally:
            store.backend.close()
        return {"Backup": record.to_json()}  # type: ignore[attr-defined]

    return body


def restore_job(
    svc: VolumeService,
    store_url: str | None,
    ref: str,
    volume: str,
    *,
    subpath: str | None = None,
    force: bool = False,
) -> Body:
    """A restore of backup `ref` (or its `subpath`) into `volume` (made if new)."""

    def body(ctx: JobContext) -> dict:
        store = open_store(store_url)
        try:
            # the backup is found and checked before a volume is created
            with service.open_restore(store, ref, subpath=subpath) as plan:
                if not subpath:
                    ctx.totals(plan.record.files, plan.record.size)
                ctx.check()
                target, result = volumes.restore_into_volume(
                    svc, volume, plan, force=force, progress=ctx.progress
                )
                record = plan.record
        finally:
            store.backend.close()
        return {
            "Restore": {
                "id": record.id,
                "target": str(target),
                "entries": result.entries,
                "files": result.files,
                "bytes": result.bytes,
            }
        }

    return body


def prune_job(
    store_url: str | None,
    policy: Policy,
    *,
    volume: str | None = None,
    dry_run: bool = False,
    grace_seconds: float,
    all_hosts: bool = False,
) -> Body:
    """A prune: forget what `policy` does not keep, sweep unreferenced data.

    It can be cancelled until it starts to forget backups; from then on it runs to its end.
    Progress counts the backups forgotten, of those to forget.
    """

    def body(ctx: JobContext) -> dict:
        def before_forget(count: int) -> None:
            ctx.totals(count, None)
            ctx.check()

        ctx.check()
        store = open_store(store_url)
        try:
            report = service.prune_backups(
                store,
                policy,
                volume=volume,
                dry_run=dry_run,
                grace_seconds=grace_seconds,
                all_hosts=all_hosts,
                before_forget=before_forget,
                progress=lambda done, size: ctx.progress(done, size, check=False),
            )
        finally:
            store.backend.close()
        return {"Prune": report.to_json()}

    return body

"""Unit tests of jobs: the table's state transitions and conflicts, the runner (with job
bodies of the test's own), the quiesce journal with a fake Docker client, and a backup
scan stopped by its progress callback (nothing published). The real path (a serving
plugin, dockerd, signals) is tests/test_volplugin_jobs_docker.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import docker
import pytest

from layerfs.store.location import open_store
from tests.test_volplugin_backup_units import FakeAPI, FakeClient, item
from volplugin.backup import hooks, service
from volplugin.backup.docs import list_backups
from volplugin.backup.errors import BackupError
from volplugin.jobs import journal as journal_mod
from volplugin.jobs.journal import Journal
from volplugin.jobs.runner import JobCancelled, JobContext, JobRunner
from volplugin.jobs.table import JobBusy, JobEnded, JobTable, NoSuchJob, Progress
from volplugin.volumes.state import State


@pytest.fixture
def db(tmp_path: Path) -> Path:
    State.under(tmp_path).close()  # the state database as serve makes it
    return tmp_path / "state.db"


@pytest.fixture
def table(db: Path):
    t = JobTable(db)
    yield t
    t.close()


@pytest.fixture
def runner(db: Path):
    r = JobRunner.open(db.parent)
    yield r
    r.shutdown(5)
    r.close()


def test_one_active_job_per_volume_and_a_prune_of_all_excludes_every_other(table):
    a = table.add("backup", "a", {})
    assert a.id.startswith("j-") and len(a.id) == 14 and a.state == "queued"
    with pytest.raises(JobBusy) as busy:
        table.add("restore", "a", {})
    assert str(busy.value) == (
        f"volume a is busy with backup job {a.id}: wait for it (volplugin job {a.id} --wait) "
        f"or cancel it (volplugin job {a.id} --cancel)"
    )
    b = table.add("backup", "b", {})
    with pytest.raises(JobBusy, match=f"volume a is busy with backup job {a.id}"):
        table.add("prune", None, {})
    assert table.start(a.id) and not table.start(a.id)
    assert table.finish(a.id, "succeeded", result={"Backup": {"id": "x"}})
    assert not table.finish(a.id, "failed", error="late")  # an ended job stays as it ended
    assert table.cancel_queued(b.id, "cancelled; it never ran")
    p = table.add("prune", None, {})
    with pytest.raises(JobBusy, match=r"^the backup store \(a prune of every volume\) is busy"):
        table.add("backup", "c", {})
    got = table.get(a.id)
    assert (got.state, got.result, got.error) == ("succeeded", {"Backup": {"id": "x"}}, None)
    assert got.started and got.finished
    assert [j.id for j in table.listing()] == [p.id, b.id, a.id]  # newest first
    assert [j.id for j in table.listing("a")] == [a.id]
    with pytest.raises(NoSuchJob, match="^no job j-nothing$"):
        table.get("j-nothing")


def test_progress_is_written_while_running_and_interrupted_marks_active_jobs(table):
    a = table.add("backup", "a", {})
    b = table.add("backup", "b", {})
    table.start(a.id)
    table.set_progress(a.id, Progress(3, 300, None, None))
    assert table.get(a.id).to_json()["Progress"] == {
        "Files": 3,
        "Bytes": 300,
        "TotalFiles": None,
        "TotalBytes": None,
    }
    table.set_progress(b.id, Progress(9, 9))  # a queued job has none yet
    assert table.get(b.id).progress == Progress()
    found = {j.id: j.state for j in table.interrupt_all()}
    assert found == {a.id: "running", b.id: "queued"}
    assert table.get(a.id).state == "interrupted"
    assert "while this job was running" in (table.get(a.id).error or "")
    assert "while this job was queued" in (table.get(b.id).error or "")
    assert table.active() == [] and table.interrupt_all() == []


def test_listing_shows_active_jobs_and_the_last_50_ended(table):
    ids = []
    for n in range(60):
        job = table.add("backup", f"v{n}", {})
        table.start(job.id)
        table.finish(job.id, "failed", error="x")
        ids.append(job.id)
    running = table.add("backup", "v0", {})
    shown = [j.id for j in table.listing()]
    assert shown == [running.id, *ids[::-1][:50]]
    assert len(table.listing(every=True)) == 61
    assert table.forget_old(keep=10) == 50
    assert len(table.listing(every=True)) == 11


def test_runner_runs_bodies_reports_results_errors_and_cancels(runner):
    runner.start()
    done = runner.submit("backup", "a", lambda ctx: {"Backup": {"id": ctx.id}}, {})
    job = runner.wait(done.id, 30)
    assert job.state == "succeeded" and job.result == {"Backup": {"id": done.id}}

    def broken(ctx: JobContext) -> dict:
        raise BackupError("the store is gone: try later")

    job = runner.wait(runner.submit("backup", "a", broken, {}).id, 30)
    assert (job.state, job.error) == ("failed", "the store is gone: try later")

    def crashes(ctx: JobContext) -> dict:
        raise KeyError("bug")

    job = runner.wait(runner.submit("backup", "a", crashes, {}).id, 30)
    assert job.state == "failed" and "internal error in volplugin (KeyError" in (job.error or "")

    entered = threading.Event()

    def endless(ctx: JobContext) -> dict:
        ctx.totals(None, None)
        n = 0
        while True:
            n += 1
            ctx.progress(n, n * 10)
            entered.set()

    running = runner.submit("backup", "a", endless, {})
    assert entered.wait(30)
    with pytest.raises(JobBusy):
        runner.submit("backup", "a", endless, {})
    runner.cancel(running.id)
    job = runner.wait(running.id, 30)
    assert (job.state, job.error) == ("cancelled", "cancelled by request (Jobs.Cancel)")
    assert job.progress.files > 0 and job.progress.bytes == job.progress.files * 10
    with pytest.raises(JobEnded, match="is cancelled: only a queued or running job"):
        runner.cancel(running.id)


def test_a_queued_job_is_cancelled_before_it_runs_and_stop_cancels_the_rest(db):
    runner = JobRunner.open(db.parent, workers=1)  # not started: jobs stay queued
    try:
        ran = []
        first = runner.submit("backup", "a", lambda ctx: ran.append(ctx.id) or {}, {})
        second = runner.submit("restore", "b", lambda ctx: ran.append(ctx.id) or {}, {})
        job = runner.cancel(first.id)
        assert (
            job.state == "cancelled"
            and job.error == "cancelled by request (Jobs.Cancel); it never ran"
        )
        runner.shutdown(5)
        job = runner.table.get(second.id)
        assert job.state == "cancelled" and "before it ran" in (job.error or "")
        assert ran == []
        with pytest.raises(Exception, match="the plugin is stopping"):
            runner.submit("backup", "c", lambda ctx: {}, {})
    finally:
        runner.close()


def test_jobs_left_by_a_dead_server_are_interrupted_at_open(db):
    first = JobRunner.open(db.parent)
    queued = first.submit("backup", "a", lambda ctx: {}, {})  # never started: the "crash"
    first.close()
    second = JobRunner.open(db.parent)
    try:
        assert second.table.get(queued.id).state == "interrupted"
        assert second.table.add("backup", "a", {}).state == "queued"  # not busy any more
    finally:
        second.close()


def test_quiesce_journals_each_container_until_it_is_put_back(db):
    journal = Journal(db)
    try:
        api = FakeAPI(
            [item("app", {hooks.LABEL_STOP: "true"}), item("db", {hooks.LABEL_PAUSE: "1"})]
        )
        seen: list[list[tuple[str, str]]] = []
        q = hooks.Quiesce(
            lambda: FakeClient(api), "vol", "drv", journal=journal.for_job("j-1"), check=None
        )
        with q:
            seen.append([(e.container, e.action) for e in journal.entries()])
        assert seen == [[("app", "stopped"), ("db", "paused")]]
        assert journal.entries() == []

        def cancelled() -> None:
            raise JobCancelled("cancelled by request (Jobs.Cancel)")

        api = FakeAPI([item("app", {hooks.LABEL_STOP: "true"})])
        q = hooks.Quiesce(lambda: FakeClient(api), "vol", "drv", check=cancelled)
        with pytest.raises(JobCancelled), q:
            pytest.fail("a cancelled backup takes no snapshot")
        assert api.calls == []
    finally:
        journal.close()


class RecoveryAPI:
    """start/unpause of containers after a crash: one is gone, one is not paused."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def start(self, cid: str) -> None:
        self.calls.append(("start", cid))
        if cid == "gone":
            response = type("R", (), {"status_code": 404, "reason": "Not Found", "url": "/start"})()
            raise docker.errors.NotFound("No such container: gone", response=response)

    def unpause(self, cid: str) -> None:
        self.calls.append(("unpause", cid))
        response = type("R", (), {"status_code": 409, "reason": "Conflict", "url": "/unpause"})()
        raise docker.errors.APIError("is not paused", response=response)


def test_put_back_starts_and_unpauses_what_a_dead_job_left(db, caplog):
    journal = Journal(db)
    try:
        for cid, action in (("app", "stopped"), ("gone", "stopped"), ("db", "paused")):
            journal.record("j-dead", cid, f"name-{cid}", action, "vol")
        journal.record("j-other", "x", "name-x", "stopped", "vol2")
        api = RecoveryAPI()

        def unreachable() -> docker.DockerClient:
            raise docker.errors.DockerException("connection refused")

        assert not journal_mod.put_back(journal, unreachable)
        assert len(journal.entries()) == 4
        assert journal_mod.put_back(journal, lambda: FakeClient(api), {"j-dead"})
        assert api.calls == [("start", "app"), ("start", "gone"), ("unpause", "db")]
        assert [e.job for e in journal.entries()] == ["j-other"]
        lines = [r.getMessage() for r in caplog.records if "j-dead" in r.getMessage()]
        assert len(lines) == 3 and "name-app (app), stopped by backup job j-dead" in lines[0]
        assert lines[0].endswith("was started again")
    finally:
        journal.close()


def test_a_backup_stopped_by_its_progress_callback_publishes_nothing(tmp_path: Path):
    vol = tmp_path / "vol"
    vol.mkdir()
    for n in range(5):
        (vol / f"f{n}").write_bytes(bytes([n]) * 1000)
    store = open_store(str(tmp_path / "store"))
    seen: list[tuple[int, int]] = []

    def progress(files: int, size: int) -> None:
        seen.append((files, size))
        if files == 2:
            raise JobCancelled("cancelled by request (Jobs.Cancel)")

    with pytest.raises(JobCancelled):
        service.create_backup(store, "v", vol, progress=progress)
    assert seen == [(1, 1000), (2, 2000)]
    assert list_backups(store.backend, "v") == []
    record = service.create_backup(store, "v", vol, progress=lambda f, s: seen.append((f, s)))
    assert seen[-1] == (5, 5000) and record.files == 5


def test_the_scheduler_starts_jobs_and_skips_a_busy_volume_until_its_next_time(db, caplog):
    from datetime import UTC, datetime, timedelta

    from volplugin.backup.scheduler import Scheduler
    from volplugin.volumes.service import VolumeService

    svc = VolumeService.open(db.parent, "vpjob-unit")
    runner = JobRunner.open(db.parent)  # not started: submitted jobs stay queued
    try:
        svc.create("vol", {"backup-schedule": "* * * * *"})
        clock = [datetime.now(UTC) + timedelta(minutes=2)]
        sched = Scheduler(svc, str(db.parent / "store"), clock=lambda: clock[0], jobs=runner)
        other = runner.submit("restore", "vol", lambda ctx: {}, {})
        assert sched.run_due() == 0
        (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert line.startswith("volume vol: scheduled backup skipped: volume vol is busy with")
        assert other.id in line
        assert sched.due(clock[0]) == []  # skipped until its next time
        runner.cancel(other.id)
        clock[0] += timedelta(minutes=1)
        assert sched.run_due() == 1
        (job,) = runner.table.active("vol")
        assert job.kind == "backup" and job.state == "queued"
        assert sched.run_due() == 0  # its own job under way: not skipped, not logged again
        assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1
    finally:
        runner.shutdown(5)
        runner.close()
        svc.state.close()

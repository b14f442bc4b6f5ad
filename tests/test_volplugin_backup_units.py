"""Unit tests of the backup automation: option values, schedules, the scheduler's choice of
due volumes, the order of consistency hooks (with a fake Docker client), and Status fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import docker
import pytest

from volplugin.backup import hooks, schedule
from volplugin.backup.retention import Policy
from volplugin.backup.scheduler import Scheduler
from volplugin.backup.status import attach as attach_status
from volplugin.backup.status import backup_status, human_age
from volplugin.backup.volumes import record_outcome
from volplugin.errors import BadOption
from volplugin.volumes import options
from volplugin.volumes.containers import ContainerRef
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import BackupInfo

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def test_backup_options_normalise():
    got = options.normalize(
        {"from": "ABCDef12", "backup-schedule": "  0  3 * * * ", "backup-keep": "weekly=4,last=7"}
    )
    assert got == {
        "backup-keep": "last=7,weekly=4",
        "backup-schedule": "0 3 * * *",
        "from": "abcdef12",
    }
    assert options.normalize({"backup-schedule": "@Daily"})["backup-schedule"] == "@daily"


@pytest.mark.parametrize("expr", ["* * * * * *", "* * * * * */5", "0 3 * * * 0"])
def test_a_sixth_cron_field_of_seconds_is_refused(expr, monkeypatch):
    monkeypatch.delenv(schedule.SECONDS_ENV, raising=False)
    with pytest.raises(BadOption) as info:
        options.normalize({"backup-schedule": expr})
    assert "'backup-schedule'" in str(info.value) and "6th field" in str(info.value)
    monkeypatch.setenv(schedule.SECONDS_ENV, "1")  # what tests run the server with
    assert options.normalize({"backup-schedule": expr})["backup-schedule"] == expr


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"from": "../etc"}, ["'from'", "backup id"]),
        ({"from": "abc"}, ["'from'", "at least 4 hex digits"]),
        ({"backup-schedule": "daily"}, ["'backup-schedule'", "cron expression", "@daily"]),
        ({"backup-schedule": "61 * * * *"}, ["'backup-schedule'", "out of range"]),
        ({"backup-schedule": "* * *"}, ["'backup-schedule'", "5 fields"]),
        ({"backup-schedule": "H * * * *"}, ["'backup-schedule'"]),
        (
            {"backup-schedule": "@daily", "backup-keep": "dayly=3"},
            ["'backup-keep'", "'dayly=3'", "last, hourly, daily, weekly, monthly, yearly"],
        ),
        ({"backup-schedule": "@daily", "backup-keep": "last=x"}, ["'backup-keep'", "0..100000"]),
        ({"backup-schedule": "@daily", "backup-keep": "last=0"}, ["'backup-keep'", "every count"]),
        ({"backup-schedule": "@daily", "backup-keep": "last=1,last=2"}, ["given twice"]),
        ({"backup-keep": "last=3"}, ["'backup-keep'", "'backup-schedule' too"]),
    ],
)
def test_bad_backup_options_name_the_option_and_the_accepted_values(opts, words):
    with pytest.raises(BadOption) as info:
        options.normalize(opts)
    for word in words:
        assert word in str(info.value)


def test_keep_parses_into_the_prune_policy():
    assert schedule.parse_keep("last=7, daily=7 ,weekly=4") == Policy(last=7, daily=7, weekly=4)
    assert schedule.format_keep(Policy(yearly=1, hourly=2)) == "hourly=2,yearly=1"


def test_next_run_reads_cron_in_utc_with_optional_seconds():
    assert schedule.next_run("*/15 * * * *", T0) == T0 + timedelta(minutes=15)
    assert schedule.next_run("0 3 * * *", T0) == datetime(2026, 3, 2, 3, 0, tzinfo=UTC)
    assert schedule.next_run("* * * * * */4", T0 + timedelta(seconds=1)) == T0 + timedelta(
        seconds=4
    )


@pytest.fixture
def svc(tmp_path):
    service = attach_status(VolumeService.open(tmp_path / "root", "vpbk-unit"))
    yield service
    service.state.close()


def _set_created(svc: VolumeService, name: str, when: datetime) -> None:
    with svc.state._write() as db:
        db.execute(
            "UPDATE volumes SET created = ? WHERE name = ?",
            (when.isoformat().replace("+00:00", "Z"), name),
        )


def test_scheduler_picks_volumes_whose_cron_time_has_come(svc):
    svc.create("every-minute", {"backup-schedule": "* * * * *", "backup-keep": "last=2"})
    svc.create("nightly", {"backup-schedule": "0 3 * * *"})
    svc.create("plain", {})
    for name in ("every-minute", "nightly", "plain"):
        _set_created(svc, name, T0 + timedelta(seconds=5))
    calls = []
    clock = [T0 + timedelta(seconds=30)]

    def fake_backup(service, store, volume, tags, *, trigger, keep):
        calls.append((volume, tuple(tags), trigger, keep))
        record_outcome(service, volume, "b" * 32, trigger=trigger)

    sched = Scheduler(svc, str(svc.root / "store"), clock=lambda: clock[0], backup=fake_backup)
    assert sched.run_due() == 0
    clock[0] = T0 + timedelta(seconds=60)
    assert [r.name for r in sched.due(clock[0])] == ["every-minute"]
    assert sched.run_due() == 1
    assert calls == [("every-minute", ("scheduled",), "schedule", Policy(last=2))]
    # The next run counts from the recorded attempt (now, in real time), not from creation.
    assert sched.due(clock[0]) == []
    clock[0] = datetime(2026, 3, 2, 3, 0, 1, tzinfo=UTC)
    assert [r.name for r in sched.due(clock[0])] == ["nightly"]


def test_a_failing_scheduled_backup_is_recorded_and_moves_the_schedule_on(svc):
    svc.create("vol", {"backup-schedule": "* * * * *"})
    _set_created(svc, "vol", T0)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    sched = Scheduler(svc, str(svc.root / "store"), clock=lambda: T0 + timedelta(minutes=5))
    sched.backup = broken
    assert sched.run_due() == 1
    info = svc.get("vol").backup
    assert info is not None and info.outcome == "failed" and info.trigger == "schedule"
    assert "scheduler" in (info.detail or "")


def test_status_shows_age_trigger_hooks_and_next_run(svc):
    record = svc.create("vol", {"backup-schedule": "0 * * * *", "backup-keep": "last=3"})
    assert backup_status(record)["Age"] is None
    svc.state.set_backup(
        "vol",
        BackupInfo(
            last_id="b1",
            last_time="2026-03-01T12:00:00Z",
            outcome="ok",
            trigger="schedule",
            hooks=["stop db: ok", "start db: ok"],
            retention="kept 3, removed 1",
        ),
    )
    st = backup_status(svc.get("vol"), now=T0 + timedelta(seconds=125))
    assert st["Age"] == "2m05s" and st["AgeSeconds"] == 125
    assert st["Trigger"] == "schedule" and st["Hooks"] == ["stop db: ok", "start db: ok"]
    assert st["Retention"] == "kept 3, removed 1"
    assert st["Schedule"] == "0 * * * *" and st["Keep"] == "last=3"
    assert st["NextRun"] == "2026-03-01T13:00:00Z"
    full = svc.describe(svc.get("vol"))["Status"]["Backup"]
    assert full["LastID"] == "b1" and full["Outcome"] == "ok" and full["Trigger"] == "schedule"


def test_human_age():
    assert [human_age(s) for s in (0, 59, 60, 3599, 3600, 90000)] == [
        "0s",
        "59s",
        "1m00s",
        "59m59s",
        "1h00m",
        "1d01h",
    ]


# -- consistency hooks with a fake Docker client ----------------------------------------------


class FakeAPI:
    """Records the calls; exec commands named in `fail` exit 3 with output 'oops'."""

    def __init__(self, items: list[dict], fail: frozenset[str] = frozenset()) -> None:
        self.items = items
        self.fail = fail
        self.calls: list[tuple[str, str]] = []
        self._execs: dict[str, tuple[str, str]] = {}

    def containers(self, all: bool, filters: dict) -> list[dict]:
        return self.items

    def stop(self, cid: str) -> None:
        self.calls.append(("stop", cid))

    def start(self, cid: str) -> None:
        self.calls.append(("start", cid))

    def pause(self, cid: str) -> None:
        self.calls.append(("pause", cid))

    def unpause(self, cid: str) -> None:
        self.calls.append(("unpause", cid))

    def exec_create(self, cid: str, cmd: list[str]) -> dict:
        exec_id = f"e{len(self._execs)}"
        self._execs[exec_id] = (cid, cmd[2])
        return {"Id": exec_id}

    def exec_start(self, exec_id: str, stream: bool = False) -> Iterator[bytes]:
        assert stream, "hook output is read as a stream (volplugin.backup.hooks.read_tail)"
        cid, cmd = self._execs[exec_id]
        self.calls.append(("exec", f"{cid}:{cmd}"))
        return iter([b"oops\n" if cmd in self.fail else b"done\n"])

    def exec_inspect(self, exec_id: str) -> dict:
        return {"ExitCode": 3 if self._execs[exec_id][1] in self.fail else 0}


class FakeClient:
    def __init__(self, api: FakeAPI) -> None:
        self.api = api

    def close(self) -> None:
        pass


def item(name: str, labels: dict[str, str], state: str = "running") -> dict:
    mount = {"Type": "volume", "Name": "vol", "Driver": "drv"}
    return {"Id": name, "Names": [f"/{name}"], "State": state, "Labels": labels, "Mounts": [mount]}


def quiesce(api: FakeAPI, mounted: bool = True) -> hooks.Quiesce:
    return hooks.Quiesce(lambda: FakeClient(api), "vol", "drv", mounted=mounted)


def test_hooks_quiet_plain_containers_first_and_bring_everything_back():
    api = FakeAPI(
        [
            item(
                "db", {hooks.LABEL_PRE: "flush", hooks.LABEL_PAUSE: "true", hooks.LABEL_POST: "x"}
            ),
            item("app", {hooks.LABEL_STOP: "true"}),
            item("idle", {}),
            item("frozen", {hooks.LABEL_PAUSE: "yes"}, state="paused"),
        ]
    )
    q = quiesce(api)
    with q:
        during = list(api.calls)
        records = q.release()
    assert during == [("stop", "app"), ("exec", "db:flush"), ("pause", "db")]
    assert api.calls[3:] == [("unpause", "db"), ("start", "app"), ("exec", "db:x")]
    assert [(r["container"], r["action"], r["ok"]) for r in records] == [
        ("app", "stop", True),
        ("frozen", "pause", True),
        ("db", "pre-backup", True),
        ("db", "pause", True),
        ("db", "unpause", True),
        ("app", "start", True),
        ("db", "post-backup", True),
    ]
    assert len(api.calls) == 6, "release runs once"


def test_a_failing_pre_backup_aborts_restarts_and_runs_nothing_else():
    api = FakeAPI(
        [
            item("app", {hooks.LABEL_STOP: "true", hooks.LABEL_POST: "post-app"}),
            item("db", {hooks.LABEL_PRE: "dump", hooks.LABEL_POST: "post-db"}),
            item("zz", {hooks.LABEL_PRE: "never"}),
        ],
        fail=frozenset({"dump"}),
    )
    q = quiesce(api)
    with pytest.raises(hooks.HookFailed) as info, q:
        pytest.fail("the body must not run")
    assert (
        "db" in str(info.value) and "exit code 3" in str(info.value) and "oops" in str(info.value)
    )
    assert api.calls == [("stop", "app"), ("exec", "db:dump"), ("start", "app")]
    assert q.problems() == ["pre-backup db: failed (exit code 3, output: oops)"]


def test_a_failed_snapshot_still_restarts_and_runs_post_hooks():
    api = FakeAPI([item("app", {hooks.LABEL_STOP: "1", hooks.LABEL_POST: "cleanup"})])
    with pytest.raises(RuntimeError), quiesce(api):
        raise RuntimeError("store unreachable")
    assert api.calls == [("stop", "app"), ("start", "app"), ("exec", "app:cleanup")]


def test_bad_labels_abort_before_anything_happens():
    api = FakeAPI([item("app", {hooks.LABEL_STOP: "true", hooks.LABEL_PAUSE: "true"})])
    with pytest.raises(hooks.HookFailed, match="both"), quiesce(api):
        pass
    api = FakeAPI([item("app", {hooks.LABEL_STOP: "maybe"})])
    with pytest.raises(hooks.HookFailed, match="use true or false"), quiesce(api):
        pass
    assert api.calls == []


def test_without_a_daemon_only_an_unmounted_volume_is_backed_up():
    def no_daemon() -> docker.DockerClient:
        raise docker.errors.DockerException("connection refused")

    with hooks.Quiesce(no_daemon, "vol", "drv", mounted=False) as q:
        pass
    assert q.actions == []
    mounted = hooks.Quiesce(no_daemon, "vol", "drv", mounted=True)
    with pytest.raises(hooks.HookFailed, match="it is mounted"), mounted:
        pass


def test_container_refs_carry_labels():
    ref = ContainerRef("i", "n", "running", {"a": "b"})
    assert ref == ContainerRef("i", "n", "running") and ref.labels == {"a": "b"}


def test_a_failure_keeps_the_last_success_and_counts(svc):
    svc.create("vol", {})
    # a record written before the success fields existed: its ok outcome is the success
    svc.state.set_backup(
        "vol", BackupInfo(last_id="b0", last_time="2026-03-01T12:00:00Z", outcome="ok")
    )
    record_outcome(svc, "vol", None, "store unreachable", trigger="api")
    info = svc.get("vol").backup
    assert info.outcome == "failed" and info.failures == 1
    assert info.success_time() == "2026-03-01T12:00:00Z"
    record_outcome(svc, "vol", None, "again", trigger="api")
    assert svc.get("vol").backup.failures == 2
    st = backup_status(svc.get("vol"))
    assert st["LastSuccessTime"] == "2026-03-01T12:00:00Z" and st["Failures"] == 2
    record_outcome(svc, "vol", "b1", trigger="api")
    info = svc.get("vol").backup
    assert info.last_success_id == "b1" and info.success_time() == info.last_time
    assert info.failures == 2 and info.detail is None

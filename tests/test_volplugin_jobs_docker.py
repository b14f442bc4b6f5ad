"""Backups as durable jobs, through a real `volplugin serve` and a real (private) dockerd.

A backup is held in its consistency hooks, deterministically, by a container whose
`volplugin.pre-backup` command waits for a file the test creates (`/data/go`): the
containers labelled `volplugin.stop-during-backup=true` are stopped first, so while the
command waits they are observed stopped and the job running. Then: SIGKILL of the plugin
(the next start puts the container back and marks the job interrupted), SIGTERM (the
job is cancelled and the container started before the process exits), two requests at
once (one job, one refusal), and Jobs.Get/List/Cancel.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import PluginProcess, start_daemon_plugin, stop_daemon_plugin
from tests.support.waiting import wait_for
from volplugin.times import parse_time

pytestmark = pytest.mark.docker

WRITER = 'trap "exit 0" TERM; while true; do date +%s%N > /data/counter; sleep 0.1; done'
IDLE = 'trap "exit 0" TERM; while true; do sleep 0.1; done'
STOP = "volplugin.stop-during-backup=true"
GATE = "volplugin.pre-backup=while [ ! -e /data/go ]; do sleep 0.1; done; echo released"
BUSY = re.compile(
    r"^volume (\S+) is busy with backup job (j-[0-9a-f]{12}): wait for it "
    r"\(volplugin job \2 --wait\) or cancel it \(volplugin job \2 --cancel\)$"
)


def uniq(what: str) -> str:
    return f"vpjob-{what}-{uuid.uuid4().hex[:6]}"


def start_plugin(daemon, base: Path, **env: str) -> PluginProcess:
    return start_daemon_plugin(daemon, base, uniq("drv"), **env)


stop_plugin = stop_daemon_plugin


@pytest.fixture
def plugin(daemon, tmp_path):
    p = start_plugin(daemon, tmp_path)
    yield p
    stop_plugin(daemon, p)


def state(daemon, container: str) -> str:
    return daemon.docker("inspect", "-f", "{{.State.Status}}", container).stdout.strip()


def ok(plugin: PluginProcess, endpoint: str, body: dict) -> dict:
    code, doc = plugin.call(endpoint, body)
    assert code == 200 and doc["Err"] == "", doc
    return doc


def get_job(plugin: PluginProcess, job_id: str, wait: float = 0) -> dict:
    return ok(plugin, "Jobs.Get", {"ID": job_id, "Wait": wait})["Job"]


def backup_ids(plugin: PluginProcess, vol: str) -> list[str]:
    return [b["id"] for b in ok(plugin, "Backup.List", {"Volume": vol})["Backups"]]


def gated_volume(daemon, plugin: PluginProcess, *opts: str) -> tuple[str, str, str]:
    """A volume with a writer labelled stop-during-backup and a gate container; its name,
    the writer's, the gate's."""
    vol = uniq("vol")
    daemon.docker("volume", "create", "-d", plugin.name, *opts, vol)
    writer, gate = uniq("writer"), uniq("gate")
    # the gate first: a backup that finds the writer running finds the gate too
    for name, labels, script in ((gate, [GATE], IDLE), (writer, [STOP], WRITER)):
        args = [a for label in labels for a in ("--label", label)]
        daemon.docker(
            "run", "-d", "--name", name, *args, "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c", script
        )
    counter = plugin.root / "volumes" / vol / "counter"
    wait_for(counter.exists, "the writer's first write")
    return vol, writer, gate


def open_gate(plugin: PluginProcess, vol: str) -> None:
    (plugin.root / "volumes" / vol / "go").touch()


def _release_a_job_that_missed(plugin: PluginProcess, vol: str, after: float = 3.0) -> bool:
    """False; but a job held at the gate for `after` seconds while the writer still runs
    started before the writer did: let it end, then close the gate again."""
    running = [
        j for j in ok(plugin, "Jobs.List", {"Volume": vol})["Jobs"] if j["State"] == "running"
    ]
    started = parse_time(running[0]["Started"]) if running else None
    if started is None or (datetime.now(UTC) - started).total_seconds() < after:
        return False
    open_gate(plugin, vol)
    wait_for(
        lambda: (
            plugin.call("Jobs.Get", {"ID": running[0]["ID"], "Wait": 5})[1]["Job"]["State"]
            not in ("queued", "running")
        ),
        "the early job to end",
    )
    (plugin.root / "volumes" / vol / "go").unlink()
    return False


def start_held_backup(daemon, plugin: PluginProcess, vol: str, writer: str) -> dict:
    """Start a backup and wait until it holds the writer stopped, in the gate's command."""
    job = ok(plugin, "Backup.Create", {"Volume": vol})["Job"]
    assert job["Kind"] == "backup" and job["Volume"] == vol and job["Result"] is None, job
    wait_for(lambda: state(daemon, writer) == "exited", "the writer stopped for the backup")
    assert get_job(plugin, job["ID"])["State"] == "running"
    return job


def test_sigkill_during_a_backup_the_next_start_puts_the_container_back(daemon, plugin):
    vol, writer, _gate = gated_volume(daemon, plugin)
    job = start_held_backup(daemon, plugin, vol, writer)

    plugin.kill()
    assert state(daemon, writer) == "exited"  # nobody put it back: the plugin is gone
    plugin.start()
    wait_for(lambda: state(daemon, writer) == "running", "the writer started again")

    after = get_job(plugin, job["ID"])
    assert after["State"] == "interrupted" and after["Finished"], after
    assert after["Error"].startswith("the plugin stopped (killed or crashed) while this job was")
    assert after["Result"] is None
    lines = [line for line in plugin.log().splitlines() if writer in line and job["ID"] in line]
    assert len(lines) == 1 and "started again" in lines[0], lines
    assert backup_ids(plugin, vol) == []
    status = ok(plugin, "VolumeDriver.Get", {"Name": vol})["Volume"]["Status"]
    assert status["Job"] is None

    # The volume is not left busy: a new backup runs (the gate is open now).
    open_gate(plugin, vol)
    code, doc = plugin.job("Backup.Create", {"Volume": vol})
    assert code == 200, doc
    assert backup_ids(plugin, vol) == [doc["Backup"]["id"]]
    assert state(daemon, writer) == "running"


def test_sigterm_during_a_backup_cancels_it_and_starts_the_container_before_exit(daemon, plugin):
    vol, writer, _gate = gated_volume(daemon, plugin)
    job = start_held_backup(daemon, plugin, vol, writer)

    assert plugin.proc is not None
    plugin.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: cancelling 1 job(s)" in plugin.log(), "the server to cancel")
    open_gate(plugin, vol)  # the gate's command ends; the job sees it was cancelled
    assert plugin.proc.wait(timeout=120) == 0
    plugin.proc = None
    assert state(daemon, writer) == "running"  # put back by the job, before the exit

    plugin.start()
    after = get_job(plugin, job["ID"])
    assert after["State"] == "cancelled", after
    assert after["Error"] == "cancelled: the plugin was stopping (SIGTERM)"
    assert backup_ids(plugin, vol) == []
    assert "started again" not in plugin.log()  # nothing was left for the start to do
    status = ok(plugin, "VolumeDriver.Get", {"Name": vol})["Volume"]["Status"]
    assert status["Backup"]["Outcome"] == "failed" and "SIGTERM" in status["Backup"]["Detail"]
    assert status["Backup"]["Hooks"][-1] == f"start {writer}: ok"


def test_two_backups_of_one_volume_at_once_one_runs_one_is_refused(daemon, plugin):
    vol, writer, _gate = gated_volume(daemon, plugin)
    other = uniq("other")
    daemon.docker("volume", "create", "-d", plugin.name, other)
    answers: list[tuple[int, dict]] = []
    start = threading.Barrier(2)

    def request() -> None:
        start.wait()
        answers.append(plugin.call("Backup.Create", {"Volume": vol}))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (won,) = [doc for code, doc in answers if code == 200]
    (lost,) = [doc for code, doc in answers if code == 500]
    job = won["Job"]
    match = BUSY.match(lost["Err"])
    assert match and match.groups() == (vol, job["ID"]), lost
    assert "Job" not in lost
    wait_for(lambda: state(daemon, writer) == "exited", "the writer stopped for the backup")

    # A prune of every volume conflicts with it too; another volume does not.
    code, doc = plugin.call("Backup.Prune", {"KeepLast": 1})
    assert code == 500 and BUSY.match(doc["Err"]).groups() == (vol, job["ID"]), doc
    # Nor can the volume go while its job runs (its container is stopped: no mounts).
    code, doc = plugin.call("VolumeDriver.Remove", {"Name": vol})
    assert code == 500 and doc["Err"].startswith("cannot remove it: "), doc
    assert BUSY.match(doc["Err"].removeprefix("cannot remove it: ")).groups() == (vol, job["ID"])
    assert (plugin.root / "volumes" / vol).is_dir()
    code, doc = plugin.job("Backup.Create", {"Volume": other})
    assert code == 200 and doc["Job"]["State"] == "succeeded", doc

    open_gate(plugin, vol)
    done = get_job(plugin, job["ID"], wait=60)
    assert done["State"] == "succeeded", done
    assert backup_ids(plugin, vol) == [done["Result"]["Backup"]["id"]]
    listed = ok(plugin, "Jobs.List", {"Volume": vol})["Jobs"]
    assert [j["ID"] for j in listed] == [job["ID"]]
    assert state(daemon, writer) == "running"


def test_jobs_get_list_and_cancel(daemon, plugin):
    code, doc = plugin.call("Jobs.Get", {"ID": "j-000000000000"})
    assert code == 500 and doc["Err"] == "no job j-000000000000"
    code, doc = plugin.call("Jobs.Get", {"ID": "j-000000000000", "Wait": 61})
    assert code == 500 and "'Wait'" in doc["Err"]

    vol, writer, _gate = gated_volume(daemon, plugin)
    job = start_held_backup(daemon, plugin, vol, writer)
    polled = get_job(plugin, job["ID"], wait=1)  # the long poll ends with the job running
    assert polled["State"] == "running" and polled["Started"] and polled["Finished"] is None
    assert [j["ID"] for j in ok(plugin, "Jobs.List", {})["Jobs"]] == [job["ID"]]
    status = ok(plugin, "VolumeDriver.Get", {"Name": vol})["Volume"]["Status"]
    assert status["Job"]["ID"] == job["ID"] and status["Job"]["State"] == "running"

    asked = ok(plugin, "Jobs.Cancel", {"ID": job["ID"]})["Job"]
    assert asked["ID"] == job["ID"] and asked["State"] in ("running", "cancelled")
    open_gate(plugin, vol)
    cancelled = get_job(plugin, job["ID"], wait=60)
    assert cancelled["State"] == "cancelled", cancelled
    assert cancelled["Error"] == "cancelled by request (Jobs.Cancel)"
    assert backup_ids(plugin, vol) == []  # nothing published
    assert state(daemon, writer) == "running"
    assert ok(plugin, "VolumeDriver.Get", {"Name": vol})["Volume"]["Status"]["Job"] is None

    code, doc = plugin.call("Jobs.Cancel", {"ID": job["ID"]})
    assert code == 500 and doc["Err"] == (
        f"job {job['ID']} is cancelled: only a queued or running job can be cancelled"
    )

    code, doc = plugin.job("Backup.Create", {"Volume": vol})
    assert code == 200, doc
    second = doc["Job"]
    assert second["Progress"]["Files"] >= 1 and second["Progress"]["Bytes"] > 0, second
    assert second["Result"]["Backup"]["id"] == backup_ids(plugin, vol)[0]
    code, doc = plugin.call("Jobs.Cancel", {"ID": second["ID"]})
    assert code == 500 and f"job {second['ID']} is succeeded" in doc["Err"]

    listed = ok(plugin, "Jobs.List", {"Volume": vol})["Jobs"]
    assert [(j["ID"], j["State"]) for j in listed] == [
        (second["ID"], "succeeded"),
        (job["ID"], "cancelled"),
    ]
    assert ok(plugin, "Jobs.List", {"Volume": uniq("none")})["Jobs"] == []

    code, doc = plugin.call("Backup.Create", {"Volume": vol, "Wait": "yes"})
    assert code == 500 and doc["Err"] == "field 'Wait' must be true or false", doc
    assert len(ok(plugin, "Jobs.List", {"Volume": vol})["Jobs"]) == 2  # it made no job

    # A restore job into a new volume, with its totals known from the backup.
    code, doc = plugin.job(
        "Backup.Restore", {"Backup": second["Result"]["Backup"]["id"], "Volume": uniq("copy")}
    )
    assert code == 200, doc
    progress = doc["Job"]["Progress"]
    assert progress["TotalFiles"] == second["Result"]["Backup"]["files"]
    assert progress["Files"] == progress["TotalFiles"], progress
    assert doc["Restore"]["files"] == progress["Files"]
    assert Path(doc["Restore"]["target"], "counter").is_file()


def test_a_scheduled_backup_is_a_job_that_holds_its_volume(daemon, tmp_path):
    plugin = start_plugin(
        daemon, tmp_path, VOLPLUGIN_CRON_SECONDS="1", VOLPLUGIN_SCHEDULE_TICK="0.5"
    )
    try:
        vol, writer, _gate = gated_volume(daemon, plugin, "-o", "backup-schedule=* * * * * */2")

        # The gate runs before the writer starts, so a job that stops the writer is held.
        # A job that began between the two holds the gate without the writer: let it end.
        wait_for(
            lambda: state(daemon, writer) == "exited" or _release_a_job_that_missed(plugin, vol),
            "a scheduled backup to stop it",
            interval=0.5,
        )
        wait_for(lambda: state(daemon, writer) == "exited", "a scheduled backup to stop it")
        jobs = ok(plugin, "Jobs.List", {"Volume": vol})["Jobs"]
        (job,) = [j for j in jobs if j["State"] == "running"]
        assert job["Kind"] == "backup" and job["Volume"] == vol
        code, doc = plugin.call("Backup.Create", {"Volume": vol})
        assert code == 500 and BUSY.match(doc["Err"]).groups() == (vol, job["ID"]), doc
        status = ok(plugin, "VolumeDriver.Get", {"Name": vol})["Volume"]["Status"]
        assert status["Job"]["ID"] == job["ID"]

        open_gate(plugin, vol)
        done = get_job(plugin, job["ID"], wait=60)
        assert done["State"] == "succeeded", done
        assert done["Result"]["Backup"]["tags"] == ["scheduled"]
        assert done["Result"]["Backup"]["id"] in backup_ids(plugin, vol)
        wait_for(lambda: state(daemon, writer) == "running", "the writer started again")
        # the scheduler saw its own job under way on every tick: nothing was skipped
        assert "scheduled backup skipped" not in plugin.log()
    finally:
        stop_plugin(daemon, plugin)

"""Docker-native backups with a real (private) dockerd, real plugin processes and the real RGW.

Consistency hooks around backups taken through the endpoint, the CLI and the schedule
(stop/start, pause/unpause, pre- and post-backup commands, failures that still bring the
containers back), `-o from=` on this host and on a second plugin root sharing the bucket,
scheduled backups with retention, the Status shown by `docker volume inspect`, and Errs
for bad option values.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support import ceph
from tests.support.dockerenv import BASE_IMAGE
from tests.support.plugin import (
    VOLPLUGIN,
    PluginProcess,
    remove_driver_objects,
    start_daemon_plugin,
    stop_daemon_plugin,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.s3]

WRITER = (
    'trap "exit 0" TERM; i=0; while true; do i=$((i+1)); echo $i > /data/counter; sleep 0.1; done'
)
IDLE = 'trap "exit 0" TERM; while true; do sleep 0.1; done'
STOP = "volplugin.stop-during-backup=true"
PAUSE = "volplugin.pause-during-backup=true"


def uniq(what: str) -> str:
    return f"vpbk-{what}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def store(s3_env):
    bucket = ceph.new_bucket(s3_env, "vpbk")
    yield f"s3://{bucket}/store"
    ceph.remove_bucket(s3_env, bucket)


def start_plugin(daemon, base: Path, store: str, **env: str) -> PluginProcess:
    return start_daemon_plugin(
        daemon, base, uniq("drv"), store, VOLPLUGIN_SCHEDULE_TICK="0.5", **env
    )


stop_plugin = stop_daemon_plugin


@pytest.fixture(scope="module")
def plugin(daemon, store, tmp_path_factory):
    p = start_plugin(daemon, tmp_path_factory.mktemp("vpbk"), store)
    yield p
    stop_plugin(daemon, p)


@pytest.fixture
def d(daemon, plugin):
    """The docker CLI against the private daemon; removes this driver's objects after."""
    yield daemon.docker
    remove_driver_objects(daemon.env, plugin.name)


def inspect(d, container: str, fmt: str) -> str:
    return d("inspect", "-f", fmt, container).stdout.strip()


def run_service(d, plugin, vol: str, *labels: str, script: str = WRITER) -> str:
    name = uniq("svc")
    args = [a for label in labels for a in ("--label", label)]
    d("run", "-d", "--name", name, *args, "-v", f"{vol}:/data", BASE_IMAGE, "sh", "-c", script)
    if script == WRITER:
        counter = plugin.root / "volumes" / vol / "counter"
        wait_for(lambda: counter.exists() and counter.read_text().strip(), "the writer")
    return name


def backup(plugin, vol: str) -> tuple[int, dict]:
    """A backup job through the endpoint, run to its end (its Result, Err and Job)."""
    return plugin.job("Backup.Create", {"Volume": vol})


def backup_ids(plugin, vol: str) -> list[str]:
    code, doc = plugin.call("Backup.List", {"Volume": vol})
    assert code == 200, doc
    return [b["id"] for b in doc["Backups"]]


def status(plugin, vol: str) -> dict:
    code, doc = plugin.call("VolumeDriver.Get", {"Name": vol})
    assert code == 200, doc
    return doc["Volume"]["Status"]["Backup"]


def hook_steps(record: dict) -> list[tuple[str, str, bool]]:
    return [(h["action"], h["container"], h["ok"]) for h in record["hooks"]]


def test_stop_during_backup_restarts_the_service_for_endpoint_and_cli(d, plugin, store):
    vol = uniq("stop")
    d("volume", "create", "-d", plugin.name, vol)
    svc = run_service(d, plugin, vol, STOP)
    idle = run_service(d, plugin, vol, script=IDLE)  # unlabelled: left alone
    before = inspect(d, svc, "{{.State.StartedAt}}")
    idle_started = inspect(d, idle, "{{.State.StartedAt}}")

    code, doc = backup(plugin, vol)
    assert code == 200, doc
    record = doc["Backup"]
    assert hook_steps(record) == [("stop", svc, True), ("start", svc, True)]
    after = inspect(d, svc, "{{.State.StartedAt}}")
    assert after != before and inspect(d, svc, "{{.State.Status}}") == "running"
    assert inspect(d, idle, "{{.State.StartedAt}}") == idle_started
    counter = plugin.root / "volumes" / vol / "counter"
    seen = counter.read_text()
    wait_for(lambda: counter.read_text() != seen, "the writer to write again")

    st = status(plugin, vol)
    assert st["LastID"] == record["id"] and st["Outcome"] == "ok" and st["Trigger"] == "api"
    assert st["Hooks"] == [f"stop {svc}: ok", f"start {svc}: ok"]

    # The CLI given only the plugin's name backs up through the plugin's socket: its hooks
    # find the service by the plugin's own driver name, and the store is the plugin's.
    env = {k: v for k, v in plugin.env.items() if k != "LAYERFS_STORE"}
    cli = subprocess.run(
        [VOLPLUGIN, "--name", plugin.name, "backup", vol, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    by_cli = json.loads(cli.stdout)
    assert hook_steps(by_cli) == [("stop", svc, True), ("start", svc, True)]
    assert inspect(d, svc, "{{.State.StartedAt}}") not in (before, after)
    assert inspect(d, svc, "{{.State.Status}}") == "running"

    (info,) = json.loads(d("volume", "inspect", vol).stdout)
    shown = info["Status"]["Backup"]
    assert shown["LastID"] == by_cli["id"] and shown["Outcome"] == "ok"
    assert shown["Age"].endswith("s") and shown["AgeSeconds"] >= 0
    assert backup_ids(plugin, vol) == [record["id"], by_cli["id"]]

    # Working on the served root directly is refused: no second backup beside the plugin's.
    refused = subprocess.run(
        [VOLPLUGIN, "--root", str(plugin.root), "backup", vol, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 1, refused.stdout
    assert f"a `volplugin serve` is running on the root {plugin.root}" in refused.stderr
    assert backup_ids(plugin, vol) == [record["id"], by_cli["id"]]
    assert inspect(d, svc, "{{.State.Status}}") == "running"


def test_failing_pre_backup_aborts_with_its_output_and_restarts_the_service(d, plugin):
    vol = uniq("prefail")
    d("volume", "create", "-d", plugin.name, vol)
    svc = run_service(d, plugin, vol, STOP, "volplugin.post-backup=touch /data/post-svc")
    dumper = run_service(
        d,
        plugin,
        vol,
        "volplugin.pre-backup=echo dump broke at step $((40+2)) >&2; exit 3",
        "volplugin.post-backup=touch /data/post-dumper",
        script=IDLE,
    )
    before = inspect(d, svc, "{{.State.StartedAt}}")

    code, doc = backup(plugin, vol)
    assert code == 500
    assert "dump broke at step 42" in doc["Err"] and dumper in doc["Err"]
    assert "exit code 3" in doc["Err"]
    assert inspect(d, svc, "{{.State.StartedAt}}") != before
    assert inspect(d, svc, "{{.State.Status}}") == "running"
    assert not (plugin.root / "volumes" / vol / "post-svc").exists()
    assert not (plugin.root / "volumes" / vol / "post-dumper").exists()
    assert backup_ids(plugin, vol) == []
    st = status(plugin, vol)
    assert st["Outcome"] == "failed" and st["LastID"] is None and st["Age"] is not None
    assert "dump broke at step 42" in st["Detail"]
    assert st["Hooks"][0] == f"stop {svc}: ok" and st["Hooks"][-1] == f"start {svc}: ok"


def test_unreachable_store_leaves_the_service_running(daemon, tmp_path):
    """The store is opened before any hook: an unreachable one stops nothing."""
    nowhere = start_plugin(
        daemon,
        tmp_path,
        "s3://vpbk-nowhere/store",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_MAX_ATTEMPTS="2",
        AWS_ACCESS_KEY_ID="unused-key",
        AWS_SECRET_ACCESS_KEY="unused-secret",
    )
    try:
        vol = uniq("nostore")
        daemon.docker("volume", "create", "-d", nowhere.name, vol)
        svc = run_service(daemon.docker, nowhere, vol, STOP)
        before = inspect(daemon.docker, svc, "{{.State.StartedAt}}")
        code, doc = backup(nowhere, vol)
        assert code == 500 and "127.0.0.1:9" in doc["Err"], doc
        assert inspect(daemon.docker, svc, "{{.State.StartedAt}}") == before
        assert inspect(daemon.docker, svc, "{{.State.Status}}") == "running"
        st = status(nowhere, vol)
        assert st["Outcome"] == "failed" and "127.0.0.1:9" in st["Detail"]
        assert not st["Hooks"]
    finally:
        stop_plugin(daemon, nowhere)


def test_pause_during_backup_pauses_and_unpauses(d, plugin):
    vol = uniq("pause")
    d("volume", "create", "-d", plugin.name, vol)
    svc = run_service(d, plugin, vol, PAUSE)
    started = inspect(d, svc, "{{.State.StartedAt}}")
    since = f"{time.time():.3f}"
    code, doc = backup(plugin, vol)
    assert code == 200, doc
    until = int(time.time()) + 1
    assert hook_steps(doc["Backup"]) == [("pause", svc, True), ("unpause", svc, True)]
    events = d(
        "events", "--since", since, "--until", str(until), "--filter", f"container={svc}"
    ).stdout
    actions = [line.split()[2] for line in events.splitlines() if line.strip()]
    assert actions == ["pause", "unpause"], events
    assert inspect(d, svc, "{{.State.Status}}") == "running"
    assert inspect(d, svc, "{{.State.StartedAt}}") == started


def test_pre_backup_dump_is_in_the_backup_and_post_backup_cleans_up(d, plugin):
    vol, copy = uniq("dump"), uniq("copy")
    d("volume", "create", "-d", plugin.name, vol)
    db = run_service(
        d,
        plugin,
        vol,
        # the writer truncates the counter before each write: read until it has a value
        'volplugin.pre-backup=c=; while [ -z "$c" ]; do c=$(cat /data/counter); done; '
        'echo "dump at $c" > /data/dump.sql && echo dumped',
        "volplugin.post-backup=rm /data/dump.sql",
    )
    code, doc = backup(plugin, vol)
    assert code == 200, doc
    record = doc["Backup"]
    assert hook_steps(record) == [("pre-backup", db, True), ("post-backup", db, True)]
    assert record["hooks"][0]["detail"] == "dumped"
    assert not (plugin.root / "volumes" / vol / "dump.sql").exists()

    d("volume", "create", "-d", plugin.name, "-o", f"from={record['id']}", copy)
    out = d("run", "--rm", "-v", f"{copy}:/r", BASE_IMAGE, "cat", "/r/dump.sql").stdout
    assert out.startswith("dump at ") and int(out.split()[-1]) > 0


def test_from_backup_on_this_host_and_on_a_second_root_sharing_the_bucket(
    d, daemon, plugin, store, tmp_path
):
    vol = uniq("orig")
    d("volume", "create", "-d", plugin.name, "-o", "uid=1000", vol)
    data = plugin.root / "volumes" / vol
    (data / "sub").mkdir()
    (data / "sub" / "notes.txt").write_text("kept in the bucket\n")
    os.chown(data / "sub" / "notes.txt", 1000, 1000)
    code, doc = backup(plugin, vol)
    assert code == 200, doc
    backup_id = doc["Backup"]["id"]
    os.unlink(data / "sub" / "notes.txt")  # the restore must come from the store

    here = uniq("here")
    d("volume", "create", "-d", plugin.name, "-o", f"from={backup_id[:12]}", here)
    out = d(
        "run", "--rm", "-v", f"{here}:/r", BASE_IMAGE, "stat", "-c", "%u %n", "/r/sub/notes.txt"
    )
    assert out.stdout.strip() == "1000 /r/sub/notes.txt"
    (info,) = json.loads(d("volume", "inspect", here).stdout)
    assert info["Status"]["Options"] == {"from": backup_id[:12]}

    other = start_plugin(daemon, tmp_path / "host2", store)
    try:
        there = uniq("there")
        d("volume", "create", "-d", other.name, "-o", f"from={backup_id}", there)
        assert other.root != plugin.root
        out = d("run", "--rm", "-v", f"{there}:/r", BASE_IMAGE, "cat", "/r/sub/notes.txt")
        assert out.stdout == "kept in the bucket\n"

        missing = uniq("missing")
        bad = d("volume", "create", "-d", other.name, "-o", "from=deadbeef", missing, check=False)
        assert bad.returncode != 0 and "deadbeef" in bad.stderr and "no backup" in bad.stderr
        assert missing not in d("volume", "ls", "-q").stdout.split()
        assert not (other.root / "volumes" / missing).exists()
    finally:
        stop_plugin(daemon, other)


def test_schedule_backs_up_with_hooks_and_applies_keep(daemon, store, tmp_path):
    sched = start_plugin(daemon, tmp_path, store, VOLPLUGIN_CRON_SECONDS="1")  # every 3 s
    d = daemon.docker
    try:
        vol = uniq("sched")
        every3s = ["-o", "backup-schedule=* * * * * */3", "-o", "backup-keep=last=2"]
        d("volume", "create", "-d", sched.name, *every3s, vol)
        svc = run_service(d, sched, vol, STOP)
        first_start = inspect(d, svc, "{{.State.StartedAt}}")

        def pruned() -> bool:
            return (status(sched, vol).get("Retention") or "").endswith("removed 1")

        wait_for(pruned, "a scheduled backup that removed an older one")
        st = status(sched, vol)
        assert st["Trigger"] == "schedule" and st["Outcome"] == "ok"
        assert st["Retention"] == "kept 2, removed 1"
        assert st["Hooks"] == [f"stop {svc}: ok", f"start {svc}: ok"]
        assert st["Schedule"] == "* * * * * */3" and st["Keep"] == "last=2" and st["NextRun"]
        assert inspect(d, svc, "{{.State.StartedAt}}") != first_start
        assert inspect(d, svc, "{{.State.Status}}") == "running"

        sched.stop()  # cancels a running scheduled backup (nothing published) or lets it end
        listing = subprocess.run(
            [VOLPLUGIN, "backups", vol, "--json", "--store", store],
            capture_output=True,
            text=True,
            env=sched.env,
        )
        assert listing.returncode == 0, listing.stderr
        kept = json.loads(listing.stdout)
        assert len(kept) == 2 and all(b["tags"] == ["scheduled"] for b in kept)
    finally:
        stop_plugin(daemon, sched)


@pytest.mark.parametrize(
    "opts, words",
    [
        (["backup-schedule=every day"], ["'backup-schedule'", "cron expression", "@daily"]),
        (
            ["backup-schedule=@daily", "backup-keep=forever"],
            ["'backup-keep'", "last=7,daily=7,weekly=4", "last, hourly, daily, weekly"],
        ),
        (["backup-keep=last=3"], ["'backup-keep'", "'backup-schedule'"]),
        (["from=latest"], ["'from'", "backup id"]),
    ],
)
def test_bad_backup_options_give_an_err_naming_them(d, plugin, opts, words):
    vol = uniq("bad")
    args = [a for opt in opts for a in ("-o", opt)]
    bad = d("volume", "create", "-d", plugin.name, *args, vol, check=False)
    assert bad.returncode != 0
    for word in words:
        assert word in bad.stderr, bad.stderr
    listed = d("volume", "ls", "-q", "--filter", f"driver={plugin.name}").stdout.split()
    assert vol not in listed

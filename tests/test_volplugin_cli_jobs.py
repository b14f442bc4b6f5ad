"""The CLI's job commands against a fake plugin that answers the jobs API contract.

backup/restore/prune start a job and follow it (plain progress lines when stderr is no
terminal, a rich bar on one), --no-wait, `jobs`, `job --wait/--cancel`, the busy
refusal, a failed job, `inspect` showing a running job, and Ctrl-C while following.
The fake (tests/support/fakejobs.py) runs in the test process on a unix socket; the
CLI runs in-process (CliRunner) or as the real `volplugin` command.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.fakejobs import FakePlugin
from tests.support.plugin import VOLPLUGIN
from tests.support.waiting import wait_for
from volplugin import follow
from volplugin.cli import cli

JOB_ID = re.compile(r"j-[0-9a-f]{12}")


@pytest.fixture(autouse=True)
def no_store_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands here name no store, so they go through the plugin (with a store named,
    backups, restores and prunes run on it directly)."""
    monkeypatch.delenv("LAYERFS_STORE", raising=False)


@pytest.fixture
def fast_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain progress lines every 0.1 s instead of every few seconds."""
    monkeypatch.setattr(follow, "PLAIN_EVERY", 0.1)


def run(fake: FakePlugin, *args: str) -> object:
    where = ["--plugin-dir", str(fake.plugin_dir), "--name", fake.name]
    return CliRunner().invoke(cli, [*where, *args], catch_exceptions=False)


def error_line(result) -> str:  # noqa: ANN001 - click's Result
    """The one line a failed command printed on stderr."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("volplugin: error")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_backup_follows_its_job_with_plain_progress_lines(tmp_path: Path, fast_lines) -> None:
    with FakePlugin(tmp_path / "plugins", steps=5, step_delay=0.15) as fake:
        result = run(fake, "backup", "v1", "--tag", "nightly")
    assert result.exit_code == 0, result.stderr
    assert fake.calls("Backup.Create") == [{"Volume": "v1", "Tags": ["nightly"]}]
    polls = fake.calls("Jobs.Get")
    assert polls and all(doc["Wait"] == 0.1 for doc in polls)
    (job,) = fake.jobs.values()
    out = result.stdout.splitlines()
    assert out[0].startswith("backed up v1: 5 files (5.0 MiB), read 5.0 MiB, new 2.5 MiB")
    assert out[1] == f"backup {job['Result']['Backup']['id']}"
    lines = result.stderr.splitlines()
    running = [line for line in lines if ": running, " in line]
    assert len(running) >= 2, lines
    assert all(line.startswith(f"backup of v1 ({job['ID']}): running, ") for line in running)
    assert any(re.search(r"[1-4]/5 files, [\d.]+ MiB/5\.0 MiB, .*/s, ETA \d+:\d\d", line)
               for line in running), running  # fmt: skip
    assert re.fullmatch(
        rf"backup of v1 \({job['ID']}\): succeeded in [\d.]+ s, 5/5 files, 5\.0 MiB/5\.0 MiB",
        lines[-1],
    ), lines[-1]


def test_unknown_totals_show_counts_without_eta(tmp_path: Path, fast_lines) -> None:
    with FakePlugin(tmp_path / "plugins", steps=3, step_delay=0.15, totals=False) as fake:
        result = run(fake, "backup", "v1", "--json")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)  # stdout holds the JSON only
    assert record["volume"] == "v1" and record["files"] == 3
    running = [line for line in result.stderr.splitlines() if ": running, " in line]
    assert running and all("ETA" not in line and "/5" not in line for line in running)
    assert any(re.search(r"running, \d files, [\d.]+ MiB", line) for line in running), running


def test_a_failed_job_is_one_error_line(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", steps=1, step_delay=0.05, fail="disk on fire") as fake:
        result = run(fake, "backup", "v1")
    (job,) = fake.jobs.values()
    assert (
        error_line(result) == f"volplugin: error: backup of v1 job {job['ID']} failed: disk on fire"
    )
    assert "backed up" not in result.stdout


def test_no_wait_then_job_wait(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", steps=3, step_delay=0.1) as fake:
        started = run(fake, "backup", "v1", "--no-wait")
        assert started.exit_code == 0, started.stderr
        job_id = started.stdout.strip()
        assert JOB_ID.fullmatch(job_id) and job_id in fake.jobs
        assert f"job {job_id} --wait` follows it" in started.stderr
        assert fake.calls("Jobs.Get") == []  # not followed
        waited = run(fake, "job", job_id, "--wait")
    assert waited.exit_code == 0, waited.stderr
    out = waited.stdout
    assert f"ID:        {job_id}" in out and "State:     succeeded" in out
    assert "Progress:  3/3 files, 3.0 MiB/3.0 MiB" in out
    assert re.search(r"Result:    backed up v1: 3 files", out), out
    assert any(doc.get("Wait") for doc in fake.calls("Jobs.Get"))


def test_no_wait_json_prints_the_job(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", hold=True) as fake:
        started = run(fake, "restore", "abc123", "--to", "v2", "--force", "--no-wait", "--json")
        assert started.exit_code == 0, started.stderr
        job = json.loads(started.stdout)
        assert job["Kind"] == "restore" and job["Volume"] == "v2" and job["ID"] in fake.jobs
    assert fake.calls("Backup.Restore") == [{"Backup": "abc123", "Volume": "v2", "Force": True}]


def test_busy_volume_is_refused_in_one_line(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", hold=True) as fake:
        first = run(fake, "backup", "v1", "--no-wait").stdout.strip()
        second = run(fake, "backup", "v1")
        line = error_line(second)
        assert line.startswith(f"volplugin: error: volume v1 is busy with backup job {first}")
        assert f"volplugin job {first} --cancel" in line
        assert len(fake.jobs) == 1


def test_jobs_lists_and_filters(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", hold=True) as fake:
        a = run(fake, "backup", "v1", "--no-wait").stdout.strip()
        b = run(fake, "backup", "v2", "--no-wait").stdout.strip()
        wait_for(lambda: all(j["State"] == "running" for j in fake.jobs.values()), "both running")
        table = run(fake, "jobs")
        assert table.exit_code == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["ID", "KIND", "VOLUME", "STATE", "CREATED", "PROGRESS"]
        assert [line.split()[:4] for line in lines[1:]] == [
            [b, "backup", "v2", "running"],
            [a, "backup", "v1", "running"],
        ]
        listed = json.loads(run(fake, "jobs", "--json", "--volume", "v1", "--all").stdout)
        assert [j["ID"] for j in listed] == [a]
        assert fake.calls("Jobs.List")[-1] == {"All": True, "Volume": "v1"}


def test_job_cancel_and_wait(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", hold=True, step_delay=0.05) as fake:
        job_id = run(fake, "backup", "v1", "--no-wait").stdout.strip()
        shown = run(fake, "job", job_id)
        assert shown.exit_code == 0 and "Kind:      backup" in shown.stdout
        assert fake.calls("Jobs.Cancel") == []
        cancelled = run(fake, "job", job_id, "--cancel", "--wait", "--json")
        assert cancelled.exit_code == 0, cancelled.stderr
        assert json.loads(cancelled.stdout)["State"] == "cancelled"
        assert fake.calls("Jobs.Cancel") == [{"ID": job_id}]
        again = run(fake, "job", job_id, "--cancel")
        assert "has already cancelled" in error_line(again)
        waited = run(fake, "job", job_id, "--wait")  # ended, not by this command's asking
        assert "State:     cancelled" in waited.stdout
        assert error_line(waited).endswith(
            f"backup of v1 job {job_id} was cancelled: cancelled on request"
        )
        missing = run(fake, "job", "j-000000000000")
        assert error_line(missing) == "volplugin: error: no job j-000000000000"


def test_inspect_shows_the_running_job(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", hold=True) as fake:
        idle = run(fake, "inspect", "v1")
        assert idle.exit_code == 0 and "Job:" not in idle.stdout
        job_id = run(fake, "backup", "v1", "--no-wait").stdout.strip()
        wait_for(lambda: fake.jobs[job_id]["Progress"]["Files"] >= 1, "the job to progress")
        shown = run(fake, "inspect", "v1")
        line = rf"^Job:         {job_id} backup of v1: running, \d+/4 files"
        assert re.search(line, shown.stdout, re.MULTILINE), shown.stdout
        assert (
            json.loads(run(fake, "inspect", "v1", "--json").stdout)["Status"]["Job"]["ID"] == job_id
        )


def test_restore_and_prune_through_jobs(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", steps=2, step_delay=0.05) as fake:
        restored = run(fake, "restore", "abc123", "--to", "v2", "--path", "sub")
        assert restored.exit_code == 0, restored.stderr
        assert restored.stdout.startswith("restored backup abc123 into /fake/volumes/v2: 3 entries")
        pruned = run(fake, "prune", "--keep-last", "1", "--volume", "v1", "--grace", "0")
        assert pruned.exit_code == 0, pruned.stderr
    assert fake.calls("Backup.Restore") == [
        {"Backup": "abc123", "Volume": "v2", "Force": False, "Path": "sub"}
    ]
    (prune,) = fake.calls("Backup.Prune")
    assert prune["KeepLast"] == 1 and prune["Volume"] == "v1" and prune["Grace"] == 0
    assert prune["DryRun"] is False and prune["AllHosts"] is False
    assert pruned.stdout.splitlines() == [
        f"keep   {'a' * 12} v1 (last)",
        f"forget {'b' * 12} v1 (remove)",
        "removed 1 backups, 3 objects (3.0 MiB)",
    ]


def test_store_on_the_command_line_is_refused_for_a_plugin_job(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins") as fake:
        result = run(fake, "backup", "v1", "--store", str(tmp_path / "store"))
        assert "--store works in-process only" in error_line(result)
        assert fake.requests == []


def _cli_env() -> dict[str, str]:
    return dict(os.environ, COLUMNS="160")


def test_ctrl_c_stops_following_and_the_job_goes_on(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", hold=True) as fake:
        proc = subprocess.Popen(
            [VOLPLUGIN, "--plugin-dir", str(fake.plugin_dir), "--name", fake.name]
            + ["backup", "v1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_cli_env(),
        )
        try:
            wait_for(lambda: fake.calls("Jobs.Get"), "the CLI to follow its job",
                     guard=lambda: proc.poll() is None)  # fmt: skip
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        (job,) = fake.jobs.values()
        assert proc.returncode == 130, (out, err)
        assert "Traceback" not in err
        assert job["State"] == "running" and fake.calls("Jobs.Cancel") == []
        again = f"volplugin --name {fake.name} --plugin-dir {fake.plugin_dir} job {job['ID']}"
        assert (
            f"stopped following; the backup of v1 job {job['ID']} goes on in the plugin: "
            f"`{again} --wait` follows it again, `{again} --cancel` cancels it"
        ) in err


def test_a_terminal_gets_a_progress_bar(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins", steps=4, step_delay=0.8) as fake:
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen(
                [VOLPLUGIN, "--plugin-dir", str(fake.plugin_dir), "--name", fake.name]
                + ["backup", "v1"],
                stdout=subprocess.PIPE,
                stderr=slave,
                text=True,
                env=_cli_env(),
            )
            os.close(slave)
            screen = b""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # the pty closed: the command ended
                        break
                    if not chunk:
                        break
                    screen += chunk
                elif proc.poll() is not None:
                    break
            out, _ = proc.communicate(timeout=30)
        finally:
            os.close(master)
    assert proc.returncode == 0, screen
    text = screen.decode(errors="replace")
    assert "\x1b[" in text  # a live display, not plain lines
    assert "backup of v1: running" in text and "backup of v1: succeeded" in text
    assert "4/4 files" in text and "4.0/4.0 MiB" in text and "━" in text
    assert re.search(r"\d+\.\d MiB/s", text), text
    assert ": running, " not in text  # no plain progress lines
    assert out.startswith("backed up v1: 4 files")


def test_no_plugin_is_one_clear_line(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    where = ["--plugin-dir", str(plugins), "--name", "nobody-here"]
    for args in (["ls"], ["inspect", "v1"], ["backups"], ["backup", "v1"], ["jobs"]):
        result = CliRunner().invoke(cli, [*where, *args])
        assert error_line(result) == (
            "volplugin: error: no plugin named nobody-here is running: no socket at "
            f"{plugins}/nobody-here.sock; start `volplugin serve --name nobody-here` or pass "
            "--root DIR to work on a root directly"
        )
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(plugins / "stale.sock"))  # bound, never listening: like a killed server's
    try:
        result = CliRunner().invoke(cli, ["--plugin-dir", str(plugins), "--name", "stale", "ls"])
        assert "no plugin named stale is running: nothing answers on" in error_line(result)
    finally:
        stale.close()


def test_permission_denied_on_the_socket_is_one_line(tmp_path: Path) -> None:
    """A user other than root gets one line (the command is run in a forked child)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    with FakePlugin(tmp_path / "plugins") as fake:
        os.chmod(fake.socket, 0o600)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become nobody, run `volplugin ls`, report its output
            code = 2
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                where = ["--plugin-dir", str(fake.plugin_dir), "--name", fake.name]
                result = CliRunner().invoke(cli, [*where, "ls"])
                os.write(write_end, f"{result.exit_code}\n{result.stderr}".encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            report = f.read().decode()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    exit_code, stderr = report.split("\n", 1)
    assert exit_code == "1"
    assert stderr.strip() == (
        f"volplugin: error: permission denied on {fake.socket}: the plugin socket is root's; "
        "run this command as root"
    )
    assert fake.requests == []


def test_jobs_and_no_wait_belong_to_the_plugin(tmp_path: Path) -> None:
    with FakePlugin(tmp_path / "plugins") as fake:
        for args in (["jobs"], ["job", "j-000000000000"]):
            line = error_line(run(fake, *args, "--root", str(tmp_path / "root")))
            assert "asks the running plugin (its jobs live there): drop --root" in line
        src = tmp_path / "src"
        src.mkdir()
        for args in (
            ["backup", "v1", "--path", str(src), "--no-wait"],
            ["restore", "abc", "--to-dir", str(tmp_path / "out"), "--no-wait"],
        ):
            line = error_line(run(fake, *args, "--store", str(tmp_path / "store")))
            assert "--no-wait starts a job in the plugin" in line
        assert fake.requests == []

"""`volplugin serve --metrics-address`: a real plugin, backups through its socket, and a
real HTTP scrape of its Prometheus metrics (parsed with prometheus_client's parser).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.plugin import PluginProcess, metrics_url, without_docker
from volplugin.backup.status import parse_time
from volplugin.volumes.state import State

VOLPLUGIN = str(Path(sys.executable).parent / "volplugin")
SUCCESS = "volplugin_backup_last_success_timestamp_seconds"


@pytest.fixture
def plugin(tmp_path):
    store = tmp_path / "store"
    args = ("--store", str(store), "--sidekick-dir", str(tmp_path / "sk"))
    args += ("--metrics-address", "127.0.0.1:0")
    p = PluginProcess(tmp_path / "root", env=without_docker(tmp_path), args=args).start()
    p.store = store
    yield p
    p.cleanup()


def scrape(plugin: PluginProcess) -> dict[tuple[str, tuple], float]:
    """Every sample: {(name, sorted labels): value}."""
    with urllib.request.urlopen(metrics_url(plugin), timeout=30) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def of(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def state_success(plugin: PluginProcess, volume: str) -> float:
    state = State.under(plugin.root, create=False)
    try:
        record = state.get(volume)
    finally:
        state.close()
    assert record is not None and record.backup is not None
    return parse_time(record.backup.success_time()).timestamp()


def ok(plugin: PluginProcess, endpoint: str, doc: dict) -> dict:
    code, answer = plugin.call(endpoint, doc)
    assert code == 200, answer
    return answer


def test_backup_metrics_follow_the_state_and_survive_a_restart(plugin):
    ok(plugin, "VolumeDriver.Create", {"Name": "m-data"})
    ok(plugin, "VolumeDriver.Create", {"Name": "m-idle"})
    (plugin.root / "volumes" / "m-data" / "file").write_bytes(b"metrics " * 50_000)
    before = scrape(plugin)
    assert of(before, SUCCESS, volume="m-data") == 0  # never backed up
    assert of(before, "volplugin_backup_failures_total", volume="m-data") == 0

    code, done = plugin.job("Backup.Create", {"Volume": "m-data"})
    assert code == 200, done
    backup = done["Backup"]
    after = scrape(plugin)
    when = state_success(plugin, "m-data")
    assert of(after, SUCCESS, volume="m-data") == when > 0
    assert of(after, SUCCESS, volume="m-idle") == 0
    assert of(after, "volplugin_backup_last_read_bytes", volume="m-data") == backup["bytes_read"]
    assert backup["bytes_read"] == 400_000
    stored = of(after, "volplugin_backup_last_stored_bytes", volume="m-data")
    assert stored == backup["bytes_stored"]
    duration = of(after, "volplugin_backup_last_duration_seconds", volume="m-data")
    assert duration == backup["duration"]
    assert of(after, "volplugin_backup_last_read_bytes", volume="m-idle") is None
    # request latency, labelled by endpoint
    labels = {"endpoint": "/Backup.Create", "outcome": "ok", "socket": "plugin"}
    count = "volplugin_request_duration_seconds_count"
    assert of(after, count, **labels) == 1
    assert of(after, count, **{**labels, "endpoint": "/VolumeDriver.Create"}) == 2

    # A failed backup counts, and keeps the last success's time and figures.
    shutil.move(plugin.store, plugin.store.with_name("store.away"))
    plugin.store.write_text("not a store\n")
    code, answer = plugin.job("Backup.Create", {"Volume": "m-data"})
    assert code == 500, answer
    failed = scrape(plugin)
    assert of(failed, "volplugin_backup_failures_total", volume="m-data") == 1
    assert of(failed, SUCCESS, volume="m-data") == when
    assert of(failed, "volplugin_backup_last_read_bytes", volume="m-data") == 400_000
    errors = {"endpoint": "/Backup.Create", "outcome": "error", "socket": "plugin"}
    assert of(failed, "volplugin_request_duration_seconds_count", **errors) == 1

    # A restart resets none of what operators alert on (it comes from the state).
    plugin.stop()
    plugin.store.unlink()
    shutil.move(plugin.store.with_name("store.away"), plugin.store)
    plugin.start()
    again = scrape(plugin)
    assert of(again, SUCCESS, volume="m-data") == when
    assert of(again, "volplugin_backup_failures_total", volume="m-data") == 1
    assert of(again, "volplugin_backup_last_duration_seconds", volume="m-data") == duration
    assert of(again, "volplugin_request_duration_seconds_count", **labels) is None  # a new process

    # Unknown paths share one label, so clients cannot grow the label set.
    assert plugin.call("No.Such.Endpoint-1", {})[0] == 500
    assert plugin.call("No.Such.Endpoint-2", {})[0] == 500
    other = {"endpoint": "other", "outcome": "error", "socket": "plugin"}
    assert of(scrape(plugin), "volplugin_request_duration_seconds_count", **other) == 2


def test_sidekick_requests_are_labelled_by_their_socket(plugin, tmp_path):
    from tests.support.plugin import post

    ok(plugin, "VolumeDriver.Create", {"Name": "m-sk", "Opts": {"sidekick-socket": "true"}})
    sock = str(tmp_path / "sk" / "m-sk.sock")
    assert post(sock, "Backup.Create", {"Volume": "m-sk", "Wait": True})[0] == 200
    assert post(sock, "Backup.Prune", {"KeepLast": 1})[0] == 500
    samples = scrape(plugin)
    count = "volplugin_request_duration_seconds_count"
    assert of(samples, count, endpoint="/Backup.Create", outcome="ok", socket="sidekick") == 1
    assert of(samples, count, endpoint="/Backup.Prune", outcome="error", socket="sidekick") == 1
    assert of(samples, SUCCESS, volume="m-sk") == state_success(plugin, "m-sk")


@pytest.mark.parametrize(
    "address, words",
    [
        ("0.0.0.0:9101", "not a loopback address"),
        ("example.com:9101", "give an IP address"),
        ("127.0.0.1", "is not HOST:PORT"),
    ],
)
def test_metrics_address_is_checked_at_start(tmp_path, address, words):
    proc = subprocess.run(
        [VOLPLUGIN, "serve", "--name", "vp-metrics-bad", "--root", str(tmp_path / "root"),
         "--plugin-dir", str(tmp_path / "plugins"), "--metrics-address", address],
        capture_output=True, text=True, timeout=60, env=without_docker(tmp_path),
    )  # fmt: skip
    assert proc.returncode != 0
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "plugins" / "vp-metrics-bad.sock").exists()

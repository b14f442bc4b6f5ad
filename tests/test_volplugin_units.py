"""Unit tests of the plugin's modules: names, options, state, volume service, reconcile.

Docker is replaced by a fake listing here; the real daemon is used in the other
test_volplugin_* modules.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time

import docker
import pytest

from volplugin.errors import BadName, BadOption, VolumeExists, VolumeInUse, VolumeNotFound
from volplugin.volumes import options
from volplugin.volumes.diskusage import SizeCache, disk_usage
from volplugin.volumes.names import check_name
from volplugin.volumes.reconcile import reconcile, reconcile_in_background, try_reconcile
from volplugin.volumes.service import VolumeService
from volplugin.volumes.state import BackupInfo, State

DRIVER = "vp-unit"


class FakeAPI:
    """Answers `containers()` like the Docker API's container listing."""

    def __init__(self, items: list[dict] | None = None, fail: bool = False) -> None:
        self.items = items or []
        self.fail = fail

    def containers(self, all: bool = False, filters: dict | None = None) -> list[dict]:
        if self.fail:
            raise docker.errors.DockerException("daemon unreachable")
        wanted = (filters or {}).get("volume")
        return [
            i for i in self.items if wanted is None or any(m["Name"] == wanted for m in i["Mounts"])
        ]


class FakeClient:
    def __init__(self, api: FakeAPI) -> None:
        self.api = api


def container(name: str, volume: str, state: str = "running", driver: str = DRIVER) -> dict:
    return {
        "Id": name * 4,
        "Names": [f"/{name}"],
        "State": state,
        "Mounts": [{"Type": "volume", "Name": volume, "Driver": driver}],
    }


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def svc(tmp_path, api) -> VolumeService:
    service = VolumeService.open(tmp_path / "root", DRIVER, docker_factory=lambda: FakeClient(api))
    yield service
    service.state.close()


@pytest.mark.parametrize(
    "bad",
    ["", "..", ".", "a/b", "../x", "a\\b", "a\0b", "x" * 256, "-lead", ".hidden", "sp ace", None],
)
def test_bad_names_are_refused(bad):
    with pytest.raises(BadName):
        check_name(bad)


def test_good_names_pass():
    for name in ("a", "vp-1", "A.b_c-d", "x" * 255, "0" * 64):
        assert check_name(name) == name


def test_options_normalise_and_name_the_bad_one():
    assert options.normalize({"mode": "755", "uid": "0010"}) == {"mode": "0755", "uid": "10"}
    assert options.normalize(None) == {}
    with pytest.raises(
        BadOption, match=r"unknown option 'size'.*lazy, mode, on-lease-loss, roaming, .*, wait"
    ):
        options.normalize({"size": "1G"})
    with pytest.raises(BadOption, match=r"'mode'.*octal"):
        options.normalize({"mode": "rwx"})
    with pytest.raises(BadOption, match=r"'uid'"):
        options.normalize({"uid": "-1"})
    with pytest.raises(BadOption, match="string"):
        options.normalize({"gid": 5})


def test_mount_ids_count_once_and_release_at_last(svc):
    svc.create("v", None)
    svc.mount("v", "a")
    svc.mount("v", "a")
    svc.mount("v", "b")
    assert svc.get("v").mount_count == 2
    svc.unmount("v", "a")
    svc.unmount("v", "a")
    assert svc.get("v").mount_ids == ("b",)
    svc.unmount("v", "unknown")
    assert svc.get("v").mount_count == 1
    svc.unmount("v", "b")
    assert svc.get("v").mount_count == 0


def test_state_survives_reopen(tmp_path):
    state = State.under(tmp_path)
    state.add("v", {"mode": "0700"}, "2026-01-01T00:00:00Z")
    state.add_mount("v", "id1")
    state.set_backup("v", BackupInfo(last_id="b1", last_time="t", outcome="ok"))
    state.close()
    again = State.under(tmp_path, create=False)
    record = again.get("v")
    assert record.options == {"mode": "0700"}
    assert record.mount_ids == ("id1",)
    assert record.backup == BackupInfo(last_id="b1", last_time="t", outcome="ok")
    again.close()


def test_a_database_of_an_older_version_keeps_its_mounts_in_the_rebuilt_table(tmp_path):
    # The layout written before the mounts table was WITHOUT ROWID, pages of 4 KiB.
    old = sqlite3.connect(tmp_path / "state.db")
    old.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE volumes (name TEXT PRIMARY KEY, options TEXT NOT NULL,
            created TEXT NOT NULL, backup TEXT);
        CREATE TABLE mounts (
            volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
            id TEXT NOT NULL, mounted_at REAL NOT NULL,
            adopted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (volume, id));
        INSERT INTO volumes VALUES ('v', '{}', '2026-01-01T00:00:00Z', NULL);
        INSERT INTO mounts VALUES ('v', 'a', 1.0, 1), ('v', 'b', 2.0, 1);
        """
    )
    old.close()
    state = State.under(tmp_path, create=False)
    (sql,) = state._db.execute("SELECT sql FROM sqlite_master WHERE name = 'mounts'").fetchone()
    assert "WITHOUT ROWID" in sql
    assert state.get("v").mount_ids == ("a", "b")
    # Adopted IDs stand for running containers: an unknown ID releases the oldest.
    assert state.release_mount("v", "unknown") == (True, 1)
    assert state.get("v").mount_ids == ("b",)
    state.close()
    again = State.under(tmp_path, create=False)  # rebuilt once: opening again changes nothing
    assert again.get("v").mount_ids == ("b",)
    assert again._db.execute("PRAGMA page_size").fetchone() == (4096,)  # an old file keeps its
    again.close()
    (tmp_path / "new").mkdir()
    fresh = State.under(tmp_path / "new")
    assert fresh._db.execute("PRAGMA page_size").fetchone() == (1024,)
    fresh.close()


def test_state_without_database_is_an_error(tmp_path):
    with pytest.raises(Exception, match="no volplugin state"):
        State.under(tmp_path / "missing", create=False)


def test_create_is_idempotent_for_same_options_only(svc):
    first = svc.create("v", {"mode": "0700"})
    assert svc.create("v", {"mode": "700"}) == first
    with pytest.raises(VolumeExists, match="mode=0700"):
        svc.create("v", {"mode": "0755"})
    mode = stat.S_IMODE(os.stat(svc.path_of("v")).st_mode)
    assert mode == 0o700


def test_create_applies_owner(svc):
    svc.create("owned", {"uid": "1234", "gid": "4321"})
    st = os.stat(svc.path_of("owned"))
    assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_create_adopts_existing_directory_without_losing_data(svc):
    path = svc.path_of("old")
    path.mkdir()
    (path / "keep").write_text("data")
    svc.create("old", None)
    assert (path / "keep").read_text() == "data"


def test_remove_refuses_while_a_container_runs_and_names_it(svc, api):
    svc.create("v", None)
    svc.mount("v", "id1")
    api.items = [container("web", "v"), container("old", "v", state="exited")]
    with pytest.raises(VolumeInUse, match=r"container\(s\) web:"):
        svc.remove("v")
    assert svc.path_of("v").is_dir()


def test_remove_refuses_when_daemon_unreachable(svc, api):
    svc.create("v", None)
    svc.mount("v", "id1")
    api.fail = True
    with pytest.raises(VolumeInUse, match="cannot be asked"):
        svc.remove("v")


def test_remove_forgets_stale_ids_and_deletes_data(svc):
    svc.create("v", None)
    (svc.path_of("v") / "f").write_text("x")
    svc.mount("v", "id1")
    svc.remove("v")
    assert not svc.path_of("v").exists()
    assert list(svc.trash_dir.iterdir()) == []
    with pytest.raises(VolumeNotFound):
        svc.get("v")


def test_missing_volume_errors(svc):
    for call in (
        lambda: svc.mount("nope", "i"),
        lambda: svc.remove("nope"),
        lambda: svc.get("nope"),
    ):
        with pytest.raises(VolumeNotFound, match="nope"):
            call()


def test_reconcile_drops_ids_of_dead_containers(svc, api):
    for name in ("gone", "half", "kept"):
        svc.create(name, None)
    svc.mount("gone", "g1")
    for mid in ("h1", "h2", "h3"):
        svc.mount("half", mid)
    svc.mount("kept", "k1")
    api.items = [
        container("a", "half"),
        container("b", "kept"),
        container("c", "gone", state="exited"),
        container("d", "half", driver="local"),
    ]
    report = reconcile(svc, FakeClient(api))
    assert report.dropped == {"gone": 1, "half": 2}
    assert svc.get("gone").mount_count == 0
    assert svc.get("half").mount_count == 1
    assert svc.get("kept").mount_ids == ("k1",)
    # The kept ID of "half" stands for the running container: its Unmount, whatever
    # its ID, releases the volume.
    svc.unmount("half", "h1")
    assert svc.get("half").mount_count == 0


def test_disk_usage_counts_files_and_hardlinks_once(tmp_path):
    (tmp_path / "d").mkdir()
    big = tmp_path / "d" / "big"
    big.write_bytes(b"x" * 100_000)
    os.link(big, tmp_path / "link")
    usage = disk_usage(str(tmp_path))
    assert usage.complete
    assert 100_000 <= usage.bytes < 200_000
    assert disk_usage(str(tmp_path), budget=0).complete is False


def test_size_cache_answers_quickly_and_finishes_in_background(tmp_path):
    for i in range(200):
        (tmp_path / f"f{i}").write_bytes(b"x" * 5000)
    cache = SizeCache(budget=0)
    first = cache.usage(str(tmp_path))
    assert not first.complete
    deadline = time.monotonic() + 60
    while not cache.usage(str(tmp_path)).complete:
        assert time.monotonic() < deadline, "background walk never finished"
        time.sleep(0.01)
    assert cache.usage(str(tmp_path)).bytes >= 200 * 5000
    assert SizeCache(budget=5).usage(str(tmp_path)).complete


def test_reconcile_retries_in_background_until_the_daemon_answers(tmp_path, api):
    calls = []

    def factory():
        calls.append(1)
        if len(calls) < 3:
            raise docker.errors.DockerException("not yet")
        return FakeClient(api)

    service = VolumeService.open(tmp_path / "root", DRIVER, docker_factory=factory)
    service.create("v", None)
    service.mount("v", "stale")
    assert try_reconcile(service) is False
    assert service.get("v").mount_count == 1  # nothing released on a guess
    stop = threading.Event()
    thread = reconcile_in_background(service, stop, interval=0.01)
    thread.join(60)
    stop.set()
    assert not thread.is_alive()
    assert len(calls) == 3
    assert service.get("v").mount_count == 0
    service.state.close()


# -- Mount without the lock, and what keeps it safe ------------------------------------


def test_a_mount_recorded_after_removes_check_stops_the_remove(svc, monkeypatch):
    svc.create("race", None)
    clear = svc.state.clear_mounts
    svc.mount("race", "old")  # an ID the daemon no longer holds: Remove forgets it

    def clear_then_a_container_mounts(name: str) -> None:
        clear(name)
        assert svc.state.add_mount(name, "new")  # what a Mount in another thread does

    monkeypatch.setattr(svc.state, "clear_mounts", clear_then_a_container_mounts)
    with pytest.raises(VolumeInUse, match="mounted by a container while it was being removed"):
        svc.remove("race")
    assert svc.get("race").mount_ids == ("new",)
    assert svc.path_of("race").is_dir()


def test_a_mount_of_a_volume_removed_meanwhile_is_refused(svc):
    svc.create("gone", None)
    svc.remove("gone")
    assert svc.state.add_mount("gone", "c1") is False
    assert svc.state.mount_snapshot() == {}
    with pytest.raises(VolumeNotFound):
        svc.mount("gone", "c1")
    with pytest.raises(VolumeNotFound):
        svc.unmount("gone", "c1")


def _in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn)
    thread.start()
    return thread


def assert_mount_waits_for_the_lock(svc: VolumeService, name: str, mount_id: str) -> None:
    """A Mount of `name` is held up while the service lock is, and done once it is not."""
    svc.lock.acquire()
    try:
        mounting = _in_thread(lambda: svc.mount(name, mount_id))
        mounting.join(0.5)
        assert mounting.is_alive() and svc.get(name).mount_ids == ()
    finally:
        svc.lock.release()
    mounting.join(5)
    assert svc.get(name).mount_ids == (mount_id,)


def test_only_managed_volumes_wait_for_the_lock(svc):
    # Lazy volumes are managed (their directory is swapped under the lock); here a
    # stand-in mark, since a lazy volume needs a backup to come from.
    svc.hooks.managed.append(lambda opts: opts.get("mode") == "0700")
    svc.create("plain", None)
    svc.create("marked", {"mode": "0700"})
    svc.lock.acquire()
    try:
        plain = _in_thread(lambda: svc.mount("plain", "p1"))
        plain.join(5)
        assert not plain.is_alive()  # mounted while the lock was held
        assert svc.get("plain").mount_ids == ("p1",)
    finally:
        svc.lock.release()
    assert_mount_waits_for_the_lock(svc, "marked", "m1")


def test_the_last_unmount_runs_its_hooks_unless_mounted_again(svc, monkeypatch):
    ran: list[str] = []
    svc.hooks.managed.append(lambda opts: True)
    svc.hooks.on_last_unmount.append(lambda record, path: ran.append(record.name))
    svc.create("v", None)
    svc.mount("v", "a")
    svc.mount("v", "b")
    svc.unmount("v", "a")
    assert ran == []
    svc.unmount("v", "b")
    assert ran == ["v"]
    svc.unmount("v", "b")  # an ID it no longer has: no second run
    assert ran == ["v"]
    svc.mount("v", "c")
    release = svc.state.release_mount

    def release_then_mounted_again(name: str, mount_id: str):
        result = release(name, mount_id)
        svc.state.add_mount(name, "d")  # a Mount between the release and the hooks
        return result

    monkeypatch.setattr(svc.state, "release_mount", release_then_mounted_again)
    svc.unmount("v", "c")
    assert ran == ["v"] and svc.get("v").mount_ids == ("d",)


def test_the_last_unmount_of_a_volume_no_feature_manages_runs_no_hooks(svc):
    ran: list[str] = []
    svc.hooks.managed.append(lambda opts: opts.get("mode") == "0700")
    svc.hooks.on_last_unmount.append(lambda record, path: ran.append(record.name))
    svc.create("plain", None)
    svc.create("marked", {"mode": "0700"})
    for name in ("plain", "marked"):
        svc.mount(name, "a")
        svc.mount(name, "b")
        svc.unmount(name, "a")
        svc.unmount(name, "b")
        svc.unmount(name, "b")
        assert svc.get(name).mount_count == 0
    assert ran == ["marked"]


def test_a_new_volume_of_the_same_name_is_not_mounted_with_the_old_ones_options(svc):
    # Another serving process removes the volume and makes a managed one of that name:
    # this process, which kept the old one's options, must see the change.
    managed = lambda opts: opts.get("mode") == "0700"  # noqa: E731
    ran: list[str] = []
    svc.hooks.managed.append(managed)
    svc.hooks.on_last_unmount.append(lambda record, path: ran.append(record.name))
    other = VolumeService.open(svc.root, DRIVER)
    other.hooks.managed.append(managed)
    svc.create("v", None)
    svc.mount("v", "a")
    svc.unmount("v", "a")
    other.remove("v")
    other.create("v", {"mode": "0700"})
    assert_mount_waits_for_the_lock(svc, "v", "m1")
    svc.unmount("v", "m1")
    assert ran == ["v"] and svc.get("v").mount_count == 0
    other.remove("v")
    with pytest.raises(VolumeNotFound):
        svc.mount("v", "m2")
    other.state.close()


def test_sidekick_socket_option_is_a_boolean():
    assert options.normalize({"sidekick-socket": "yes"}) == {"sidekick-socket": "true"}
    assert options.normalize({"sidekick-socket": "0"}) == {"sidekick-socket": "false"}
    with pytest.raises(BadOption, match=r"'sidekick-socket'.*true or false"):
        options.normalize({"sidekick-socket": "maybe"})


def test_sidekick_socket_paths_fit_a_unix_socket_and_never_collide(tmp_path):
    from volplugin.errors import StateError
    from volplugin.sidekick.paths import SIDEKICK_DIR, socket_path

    assert socket_path(SIDEKICK_DIR, "db") == SIDEKICK_DIR / "db.sock"
    long = socket_path(SIDEKICK_DIR, "y" * 255)
    assert len(os.fsencode(long)) < 108 and long.name.startswith("_")
    assert socket_path(SIDEKICK_DIR, "y" * 254) != long
    # a file name starting with "_" is no volume's name
    with pytest.raises(BadName):
        check_name(long.stem)
    with pytest.raises(StateError, match="--sidekick-dir"):
        socket_path(tmp_path / ("d" * 90), "y" * 255)


def test_job_counts_read_a_jobs_table_when_there_is_one(tmp_path):
    from volplugin.metrics.collector import job_counts

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE volumes (name TEXT)")
    db.commit()
    assert job_counts(path) is None  # no jobs table: no job metrics
    db.execute("CREATE TABLE jobs (id TEXT, kind TEXT, volume TEXT, state TEXT)")
    db.executemany(
        "INSERT INTO jobs VALUES (?, ?, ?, ?)",
        [("j-1", "backup", "a", "running"), ("j-2", "backup", "b", "running"),
         ("j-3", "prune", None, "failed")],
    )  # fmt: skip
    db.commit()
    db.close()
    assert job_counts(path) == {("backup", "running"): 2, ("prune", "failed"): 1}
    assert job_counts(tmp_path / "missing.db") is None

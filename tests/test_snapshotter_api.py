"""containerd's snapshots API as the layerfs snapshotter answers it, over real gRPC calls.

A `layerfs snapshotter serve` subprocess and a gRPC client: bad requests get
containerd's error codes and change nothing; labels, filters, usage, cleanup
and a restart keep every snapshot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from layerfs.maintenance.pins import list_pins
from layerfs.records import get_tree, read_content
from layerfs.snapshotter.api import snapshots_pb2 as pb
from layerfs.snapshotter.api import snapshots_pb2_grpc
from layerfs.snapshotter.metadata import Kind, Metadata
from layerfs.store.location import open_store
from tests.support.containerd import Snapshotter, stop_views
from tests.support.mounts import unmount_below
from tests.support.waiting import wait_for

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def server():
    base = Path(tempfile.mkdtemp(prefix="lfssn-", dir="/tmp"))
    sn = Snapshotter(base / "store", base / "sn", base / "sn.sock", base / "sn.log")
    sn.start()
    try:
        yield sn
    finally:
        sn.stop()
        unmount_below(base)
        stop_views(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def api(server):
    with grpc.insecure_channel(f"unix://{server.address}") as channel:
        yield snapshots_pb2_grpc.SnapshotsStub(channel)


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code()


def _names(api, *filters: str) -> set[str]:
    found = set()
    for response in api.List(pb.ListSnapshotsRequest(filters=list(filters))):
        found |= {info.name for info in response.info}
    return found


def _prepare(api, key: str, parent: str = "") -> list:
    return list(api.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent)).mounts)


def test_unknown_keys_are_not_found(api):
    for call, request in [
        (api.Stat, pb.StatSnapshotRequest(key="nope")),
        (api.Mounts, pb.MountsRequest(key="nope")),
        (api.Remove, pb.RemoveSnapshotRequest(key="nope")),
        (api.Usage, pb.UsageRequest(key="nope")),
        (api.Commit, pb.CommitSnapshotRequest(name="n", key="nope")),
    ]:
        assert _code(call, request) == grpc.StatusCode.NOT_FOUND
    assert _code(api.Prepare, pb.PrepareSnapshotRequest(key="")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_bad_requests_keep_every_snapshot(api, server):
    # a parent that does not exist: nothing is created
    assert _code(_prepare, api, "orphan", "missing") == grpc.StatusCode.NOT_FOUND
    assert _code(api.Stat, pb.StatSnapshotRequest(key="orphan")) == grpc.StatusCode.NOT_FOUND

    mounts = _prepare(api, "base")
    assert mounts[0].type == "bind" and "rw" in mounts[0].options
    upper = Path(mounts[0].source)
    (upper / "etc").mkdir()
    (upper / "etc/hello").write_text("hello\n")
    (upper / "big").write_bytes(os.urandom(300_000))
    assert _code(_prepare, api, "base") == grpc.StatusCode.ALREADY_EXISTS
    # an active snapshot is no parent
    assert _code(_prepare, api, "child", "base") == grpc.StatusCode.INVALID_ARGUMENT
    usage = api.Usage(pb.UsageRequest(key="base"))
    assert usage.size >= 300_000 and usage.inodes == 3

    api.Commit(pb.CommitSnapshotRequest(name="layer1", key="base"))
    # committing twice: the active key is gone
    again = pb.CommitSnapshotRequest(name="layer1-again", key="base")
    assert _code(api.Commit, again) == grpc.StatusCode.NOT_FOUND
    # a name that exists: refused, the active snapshot and its files untouched
    other = Path(_prepare(api, "other")[0].source)
    (other / "mine").write_text("mine\n")
    taken = pb.CommitSnapshotRequest(name="layer1", key="other")
    assert _code(api.Commit, taken) == grpc.StatusCode.ALREADY_EXISTS
    assert api.Stat(pb.StatSnapshotRequest(key="other")).info.kind == pb.ACTIVE
    assert (other / "mine").read_text() == "mine\n"
    info = api.Stat(pb.StatSnapshotRequest(key="layer1")).info
    assert info.kind == pb.COMMITTED and info.parent == ""
    assert _code(api.Mounts, pb.MountsRequest(key="layer1")) == grpc.StatusCode.FAILED_PRECONDITION
    usage = api.Usage(pb.UsageRequest(key="layer1"))
    assert usage.size == 300_006 and usage.inodes >= 3

    # a child over the committed layer sees its files through the kernel overlay
    child = _prepare(api, "child", "layer1")
    assert child[0].type == "overlay" and child[0].source == "layerfs"
    options = {o.partition("=")[0]: o.partition("=")[2] for o in child[0].options}
    assert options["upperdir"].startswith(str(server.root))
    view = list(api.View(pb.ViewSnapshotRequest(key="look", parent="layer1")).mounts)
    assert view[0].type == "bind" and "ro" in view[0].options
    assert (Path(view[0].source) / "etc/hello").read_text() == "hello\n"
    assert _code(api.Commit, pb.CommitSnapshotRequest(name="v", key="look")) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    # removing a snapshot with children: refused, nothing lost
    for key in ("layer1",):
        assert _code(api.Remove, pb.RemoveSnapshotRequest(key=key)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
    assert (Path(view[0].source) / "big").stat().st_size == 300_000
    assert {"layer1", "child", "look", "other"} <= _names(api)

    # the store pins the layer until the snapshot goes
    pins = server.store / "docs" / "pins"
    assert len(list(pins.iterdir())) == 1
    for key in ("child", "look", "layer1", "other"):
        api.Remove(pb.RemoveSnapshotRequest(key=key))
    assert not list(pins.iterdir())
    assert not {"layer1", "child", "look", "other"} & _names(api)


def test_labels_filters_and_field_paths(api):
    api.Prepare(pb.PrepareSnapshotRequest(key="lab", labels={"a": "1", "b": "2"}))
    info = pb.Info(name="lab", labels={"a": "10", "c": "3"})
    mask = field_mask_pb2.FieldMask(paths=["labels.a", "labels.b"])
    updated = api.Update(pb.UpdateSnapshotRequest(info=info, update_mask=mask)).info
    assert dict(updated.labels) == {"a": "10"}  # b removed (absent from info), c not asked
    bad = field_mask_pb2.FieldMask(paths=["parent"])
    request = pb.UpdateSnapshotRequest(info=info, update_mask=bad)
    assert _code(api.Update, request) == grpc.StatusCode.INVALID_ARGUMENT
    missing = pb.UpdateSnapshotRequest(info=pb.Info(name="nope"), update_mask=mask)
    assert _code(api.Update, missing) == grpc.StatusCode.NOT_FOUND
    assert _names(api, "labels.a==10") == {"lab"}
    assert _names(api, 'labels."a"', "kind==committed") == {"lab"}
    assert "lab" not in _names(api, "kind==view")
    with pytest.raises(grpc.RpcError) as caught:
        _names(api, "colour==red")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    api.Remove(pb.RemoveSnapshotRequest(key="lab"))


def test_hostile_keys_stay_inside_the_root(api, server):
    key = "../../../escape"
    source = Path(_prepare(api, key)[0].source)
    assert source.resolve().is_relative_to(server.root.resolve())
    assert not (server.root.parent.parent / "escape").exists()
    api.Remove(pb.RemoveSnapshotRequest(key=key))
    assert not source.exists()


def test_gc_keeps_committed_layers(api, server):
    data = os.urandom(2_000_000)
    upper = Path(_prepare(api, "gc-active")[0].source)
    (upper / "data").write_bytes(data)
    api.Commit(pb.CommitSnapshotRequest(name="gc-kept", key="gc-active"))
    gc = subprocess.run(
        [sys.executable, "-c", "from layerfs.cli import main; main()",
         "--store", str(server.store), "gc", "--grace", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert gc.returncode == 0, gc.stderr
    layer = Metadata(server.root / "metadata.db").get("gc-kept").layer
    store = open_store(str(server.store))
    entries = {e.path: e for e in get_tree(store, layer.tree)[0]}
    assert read_content(store, entries["data"]) == data  # from the store, not a cache
    api.Remove(pb.RemoveSnapshotRequest(key="gc-kept"))


def test_restart_and_cleanup(api, server):
    upper = Path(_prepare(api, "keep")[0].source)
    (upper / "f").write_text("f\n")
    api.Commit(pb.CommitSnapshotRequest(name="kept", key="keep", labels={"x": "y"}))
    _prepare(api, "active-after", "kept")
    before = {
        (i.name, i.parent, i.kind) for r in api.List(pb.ListSnapshotsRequest()) for i in r.info
    }
    server.kill()
    server.start()
    with grpc.insecure_channel(f"unix://{server.address}") as channel:
        again = snapshots_pb2_grpc.SnapshotsStub(channel)
        after = {
            (i.name, i.parent, i.kind)
            for r in again.List(pb.ListSnapshotsRequest())
            for i in r.info
        }
        assert after == before
        assert dict(again.Stat(pb.StatSnapshotRequest(key="kept")).info.labels) == {"x": "y"}
        orphan = server.root / "snapshots" / "9999"
        (orphan / "fs").mkdir(parents=True)
        again.Cleanup(pb.CleanupRequest())
        assert not orphan.exists()
        assert again.Stat(pb.StatSnapshotRequest(key="active-after")).info.kind == pb.ACTIVE
        again.Remove(pb.RemoveSnapshotRequest(key="active-after"))
        again.Remove(pb.RemoveSnapshotRequest(key="kept"))


REF = "containerd.io/snapshot.ref"


def _chain_of(filler: str) -> str:
    return "sha256:" + (filler * 64)[:64]


def test_layers_committed_before_are_given_by_chain_id(api, server):
    """containerd's remote-snapshot protocol: a Prepare labelled with a chain ID the
    snapshotter holds is answered AlreadyExists, and a committed snapshot of that
    layer (found by containerd's own filter) stands in for the unpack."""
    bottom, top = _chain_of("a"), _chain_of("b")
    # an unpack as `ctr image import` makes it: key and name carry the chain ID
    upper = Path(_prepare(api, f"ns1/1/extract-1-x {bottom}")[0].source)
    (upper / "hello").write_text("from the first unpack\n")
    api.Commit(pb.CommitSnapshotRequest(name=f"ns1/2/{bottom}", key=f"ns1/1/extract-1-x {bottom}"))
    over = f"ns1/3/extract-2-y {top}"
    options = _prepare(api, over, f"ns1/2/{bottom}")[0].options
    upperdir = next(o.removeprefix("upperdir=") for o in options if o.startswith("upperdir="))
    (Path(upperdir) / "top").write_text("top\n")  # as containerd applies into the upper
    api.Commit(pb.CommitSnapshotRequest(name=f"ns1/4/{top}", key=over))
    meta = Metadata(server.root / "metadata.db")
    assert meta.get(f"ns1/2/{bottom}").chain_id == bottom
    assert meta.get(f"ns1/4/{top}").chain_id == top
    assert meta.get(f"ns1/2/{bottom}").layer.diff_id == bottom  # a bottom layer's DiffID
    assert meta.get(f"ns1/4/{top}").layer.diff_id == ""  # not known: no tar was made

    # another namespace asks for both layers by chain ID, as containerd's unpacker does
    ask = pb.PrepareSnapshotRequest(key=f"ns2/1/extract-3-z {bottom}", labels={REF: bottom})
    assert _code(api.Prepare, ask) == grpc.StatusCode.ALREADY_EXISTS
    found = _names(api, f'labels."{REF}"=={bottom},parent==""')
    assert found == {bottom}
    assert _code(api.Stat, pb.StatSnapshotRequest(key=f"ns2/1/extract-3-z {bottom}")) == (
        grpc.StatusCode.NOT_FOUND  # no active snapshot was made
    )
    ask = pb.PrepareSnapshotRequest(
        key=f"ns2/2/extract-4-w {top}", parent=bottom, labels={REF: top}
    )
    assert _code(api.Prepare, ask) == grpc.StatusCode.ALREADY_EXISTS
    assert _names(api, f'labels."{REF}"=={top},parent=="{bottom}"') == {top}
    assert _code(api.Prepare, ask) == grpc.StatusCode.ALREADY_EXISTS  # asked again: the same
    assert len(_names(api, f'labels."{REF}"=={top}')) == 1
    view = list(api.View(pb.ViewSnapshotRequest(key="see", parent=top)).mounts)
    tree = Path(view[0].source)
    assert (tree / "hello").read_text() == "from the first unpack\n"
    assert (tree / "top").read_text() == "top\n"

    # a chain ID it does not hold, or over a parent of another chain: unpacked as usual
    unknown = pb.PrepareSnapshotRequest(key="ns2/5/extract-5 x", labels={REF: _chain_of("c")})
    assert api.Prepare(unknown).mounts[0].type == "bind"
    wrong_parent = pb.PrepareSnapshotRequest(key="ns2/6/extract-6 y", parent=top, labels={REF: top})
    assert api.Prepare(wrong_parent).mounts[0].type == "overlay"
    for key in ("ns2/5/extract-5 x", "ns2/6/extract-6 y", "see", top, bottom):
        api.Remove(pb.RemoveSnapshotRequest(key=key))
    # the layers committed first are still whole
    again = list(api.View(pb.ViewSnapshotRequest(key="see2", parent=f"ns1/4/{top}")).mounts)
    assert (Path(again[0].source) / "hello").read_text() == "from the first unpack\n"
    for key in ("see2", f"ns1/4/{top}", f"ns1/2/{bottom}"):
        api.Remove(pb.RemoveSnapshotRequest(key=key))
    assert not list((server.store / "docs" / "pins").iterdir())
    meta.close()


def _helpers_of(pid: int) -> list[int]:
    """Store helpers (layerfs.snapshotter.storework) running as children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and (
            b"layerfs.snapshotter.storework" in cmdline
        ):
            found.append(int(entry.name))
    return found


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


@pytest.fixture
def own_server():
    """A snapshotter of its own, whose store helpers stop themselves after pinning while
    the file ``base/pause`` exists (the hook layerfs.snapshotter.storework reads)."""
    from layerfs.snapshotter.storework import PAUSE_FILE_VARIABLE

    base = Path(tempfile.mkdtemp(prefix="lfssk-", dir="/tmp"))
    sn = Snapshotter(base / "store", base / "sn", base / "sn.sock", base / "sn.log")
    sn.env = {PAUSE_FILE_VARIABLE: str(base / "pause")}
    sn.start()
    try:
        with grpc.insecure_channel(f"unix://{sn.address}") as channel:
            yield sn, snapshots_pb2_grpc.SnapshotsStub(channel), base / "pause"
    finally:
        sn.stop()
        subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True)
        unmount_below(base)
        stop_views(base)
        shutil.rmtree(base, ignore_errors=True)


def test_commit_helper_killed_midway_commits_nothing(own_server):
    """The commit's store work runs in a helper process; SIGKILL of it at its worst
    moment (chunks, tree and pin written, nothing answered) leaves the snapshot active
    with its upper, an error for containerd, and a retry that commits it once."""
    import threading

    sn, api, pause = own_server
    data = os.urandom(3_000_000)
    upper = Path(_prepare(api, "victim")[0].source)
    (upper / "data").write_bytes(data)
    (upper / "dir").mkdir()
    (upper / "dir/small").write_text("small\n")
    pause.touch()
    failed: list[grpc.RpcError] = []

    def commit() -> None:
        try:
            api.Commit(pb.CommitSnapshotRequest(name="done", key="victim"))
        except grpc.RpcError as exc:
            failed.append(exc)

    caller = threading.Thread(target=commit)
    caller.start()
    helper = wait_for(
        lambda: [p for p in _helpers_of(sn.proc.pid) if _stopped(p)],
        "the commit helper to stop after pinning",
    )[0]
    os.kill(helper, signal.SIGKILL)
    caller.join(60)
    assert not caller.is_alive()
    assert failed and failed[0].code() == grpc.StatusCode.INTERNAL
    assert "killed by SIGKILL" in failed[0].details()
    assert "\n" not in failed[0].details()
    # nothing committed: the snapshot is active with its upper, the name is free
    assert api.Stat(pb.StatSnapshotRequest(key="victim")).info.kind == pb.ACTIVE
    assert _code(api.Stat, pb.StatSnapshotRequest(key="done")) == grpc.StatusCode.NOT_FOUND
    assert (upper / "data").read_bytes() == data
    pins = sn.store / "docs" / "pins"
    assert len(list(pins.iterdir())) == 1  # the killed helper's pin, recorded nowhere

    pause.unlink()
    api.Commit(pb.CommitSnapshotRequest(name="done", key="victim"))
    assert api.Stat(pb.StatSnapshotRequest(key="done")).info.kind == pb.COMMITTED
    assert _code(api.Stat, pb.StatSnapshotRequest(key="victim")) == grpc.StatusCode.NOT_FOUND
    layer = Metadata(sn.root / "metadata.db").get("done")
    assert layer.kind is Kind.COMMITTED and layer.labels == {}
    held = list_pins(open_store(str(sn.store)).backend)
    assert [p.id for p in held] == [layer.pin]  # the killed helper's pin is gone
    view = Path(api.View(pb.ViewSnapshotRequest(key="look", parent="done")).mounts[0].source)
    assert (view / "data").read_bytes() == data
    assert (view / "dir/small").read_text() == "small\n"
    assert not _helpers_of(sn.proc.pid)
    api.Remove(pb.RemoveSnapshotRequest(key="look"))
    api.Remove(pb.RemoveSnapshotRequest(key="done"))
    assert not list(pins.iterdir())


def test_commit_helper_errors_reach_containerd_in_one_line(own_server):
    """A store the helper cannot write (its pins directory immutable): Commit answers
    INTERNAL with the helper's one-line error, and the snapshot stays active."""
    sn, api, _ = own_server
    upper = Path(_prepare(api, "blocked")[0].source)
    (upper / "f").write_text("f\n")
    pins = sn.store / "docs" / "pins"
    pins.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "+i", str(pins)], check=True)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            api.Commit(pb.CommitSnapshotRequest(name="blocked-done", key="blocked"))
    finally:
        subprocess.run(["chattr", "-i", str(pins)], check=True)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "Operation not permitted" in caught.value.details()
    assert "\n" not in caught.value.details()
    assert api.Stat(pb.StatSnapshotRequest(key="blocked")).info.kind == pb.ACTIVE
    api.Commit(pb.CommitSnapshotRequest(name="blocked-done", key="blocked"))
    assert api.Stat(pb.StatSnapshotRequest(key="blocked-done")).info.kind == pb.COMMITTED
    api.Remove(pb.RemoveSnapshotRequest(key="blocked-done"))
    assert not list(pins.iterdir())

"""The gRPC server: containerd's snapshots API on a unix socket, answered by a Snapshotter.

Errors reach containerd as the gRPC codes its errdefs map back: NotFound,
AlreadyExists, FailedPrecondition, InvalidArgument; anything else is
Internal with its one-line message (and a traceback in the log).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from layerfs.errors import LayerfsError
from layerfs.snapshotter.api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from layerfs.snapshotter.metadata import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    NotFound,
    Snapshot,
)
from layerfs.snapshotter.service import MountSpec, Snapshotter

log = logging.getLogger(__name__)

_CODES = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}
_KINDS = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(snap: Snapshot) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=snap.key,
        parent=snap.parent,
        kind=_KINDS[snap.kind],
        created_at=_timestamp(snap.created_ns),
        updated_at=_timestamp(snap.updated_ns),
        labels=snap.labels,
    )


def _mounts(specs: list[MountSpec]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in specs]


def _answer(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a servicer method; turn its errors into containerd's gRPC codes."""

    def run(self: SnapshotsServicer, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.monotonic()
        try:
            return method(self, request, context)
        except tuple(_CODES) as exc:
            log.info("%s: %s", method.__name__, exc)
            context.abort(_CODES[type(exc)], str(exc))
        except LayerfsError as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except OSError as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {exc}")
        finally:
            log.debug("%s: %.1f ms", method.__name__, (time.monotonic() - started) * 1000)

    run.__name__ = method.__name__
    return run


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    """containerd.services.snapshots.v1.Snapshots over a Snapshotter."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_answer
    def Prepare(self, request, context):  # noqa: N802 (gRPC method names)
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_answer
    def View(self, request, context):  # noqa: N802
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_answer
    def Mounts(self, request, context):  # noqa: N802
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_answer
    def Commit(self, request, context):  # noqa: N802
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_answer
    def Remove(self, request, context):  # noqa: N802
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_answer
    def Stat(self, request, context):  # noqa: N802
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_answer
    def Update(self, request, context):  # noqa: N802
        paths = list(request.update_mask.paths)
        snap = self.sn.meta.update_labels(request.info.name, dict(request.info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(snap))

    def List(self, request, context) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:  # noqa: N802
        try:
            found = self.sn.list(list(request.filters))
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for start in range(0, len(found), 100):
            yield snapshots_pb2.ListSnapshotsResponse(
                info=[_info(s) for s in found[start : start + 100]]
            )

    @_answer
    def Usage(self, request, context):  # noqa: N802
        usage = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_answer
    def Cleanup(self, request, context):  # noqa: N802
        self.sn.cleanup()
        return empty_pb2.Empty()


def serve(address: Path, root: Path, store_url: str, workers: int = 8) -> None:
    """Serve on the unix socket ``address`` until SIGTERM or SIGINT."""
    snapshotter = Snapshotter(root, store_url)
    address.parent.mkdir(parents=True, exist_ok=True)
    if address.is_socket():  # left by a server that was killed
        address.unlink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(snapshotter), server)
    if server.add_insecure_port(f"unix://{address}") == 0:
        raise LayerfsError(f"cannot listen on {address}")
    stopped = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    os.chmod(address, 0o600)  # root's containerd is its only client
    log.warning("layerfs snapshotter serving on %s (root %s, store %s)", address, root, store_url)
    stopped.wait()
    server.stop(grace=5).wait()
    snapshotter.close()

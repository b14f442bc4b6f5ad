"""Register an image of the store with containerd without copying a layer into it.

`layerfs containerd import IMAGE` does, against containerd's socket and namespace:

1. a lease (``ctr leases create``, expiring in an hour), so that containerd's
   gc keeps what the next steps make until the image holds it;
2. for each layer, bottom first, a Prepare through containerd's snapshots API
   with the label ``containerd.io/snapshot.ref`` = the layer's chain ID (the
   remote-snapshot protocol containerd's pull unpacker uses): the layerfs
   snapshotter finds the layer in its store, commits it under that chain ID and
   answers AlreadyExists, and containerd records the snapshot in the namespace.
   A Prepare that succeeds instead means the snapshotter lacks the layer: it is
   removed again and the import fails, naming the layer;
   Then a view of the top layer, removed at once, waits until the snapshotter
   has mounted its chain (index and metadata tree), so that the image's first
   container starts as fast as the next ones;
3. ``ctr images import --snapshotter NAME`` of an OCI archive holding only the
   index, the manifest and the config: containerd's own importer writes those
   blobs, creates the image and sets its gc labels, and its unpack finds every
   chain ID already there, so it applies nothing and only labels the config
   with the snapshot it uses (``containerd.io/gc.ref.snapshot.NAME``).

``ctr`` ships with containerd; using it for the content and the image record
keeps containerd's own rules for them (a content write is a streamed,
resumable protocol; the importer labels manifests and configs for gc) instead
of a second implementation here. The manifest's layer descriptors carry the
DiffIDs as digests (uncompressed tar media type) and the layers' file bytes as
sizes: the store keeps trees, not tars, and containerd never reads those blobs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from layerfs.catalog import ImageRecord
from layerfs.errors import LayerfsError
from layerfs.imageconfig import chain_ids, config_bytes, with_diff_ids
from layerfs.snapshotter.chains import SNAPSHOT_REF


class RegisterError(LayerfsError):
    """containerd could not be given the image."""


@dataclass(frozen=True)
class Registered:
    name: str  # the image's name in containerd
    manifest: str  # its manifest's digest
    chain_ids: list[str]  # its layers' snapshots, bottom first


def reference(name: str) -> str:
    """``name`` as a full reference, the way Docker names it in containerd
    (``busybox`` -> ``docker.io/library/busybox:latest``)."""
    rest, at, digest = name.partition("@")
    first, slash, _ = rest.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        rest = f"docker.io/{rest}" if slash else f"docker.io/library/{rest}"
    if not at and ":" not in rest.rsplit("/", 1)[-1]:
        rest += ":latest"
    return rest + at + digest


def oci_archive(image: ImageRecord, ref: str, dest: Path) -> str:
    """Write an OCI archive of ``image`` without its layers; return the manifest digest."""
    from layerfs.exporter import write_oci_layout

    diff_ids = [layer.diff_id for layer in image.layers]
    config = image.config
    if config.get("rootfs", {}).get("diff_ids") != diff_ids:
        config = with_diff_ids(config, diff_ids)
    tag = ref.rsplit(":", 1)[-1] if "@" not in ref else ""
    layers = [(layer.diff_id, layer.apparent_size) for layer in image.layers]
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        return write_oci_layout(tar, ref, tag, config_bytes(config), layers)


def _ctr(address: Path, namespace: str, *args: str) -> str:
    ctr = shutil.which("ctr")
    if ctr is None:
        raise RegisterError("ctr (shipped with containerd) is not installed")
    done = subprocess.run(
        [ctr, "--address", str(address), "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RegisterError(
            f"ctr {' '.join(args[:2])} failed: {lines[-1] if lines else done.returncode}"
        )
    return done.stdout


def _provide_layers(
    address: Path,
    namespace: str,
    lease: str,
    snapshotter: str,
    image: ImageRecord,
    chains: list[str],
) -> None:
    """Ask containerd's snapshotter for each layer's snapshot by chain ID (see above)."""
    import grpc

    from layerfs.snapshotter.api import snapshots_pb2 as pb
    from layerfs.snapshotter.api import snapshots_pb2_grpc

    header = (("containerd-namespace", namespace), ("containerd-lease", lease))
    with grpc.insecure_channel(f"unix://{os.path.abspath(address)}") as channel:
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        for i, chain in enumerate(chains):
            key = f"extract-{time.time_ns()}-layerfs {chain}"
            request = pb.PrepareSnapshotRequest(
                snapshotter=snapshotter,
                key=key,
                parent=chains[i - 1] if i else "",
                labels={SNAPSHOT_REF: chain},
            )
            try:
                stub.Prepare(request, metadata=header, timeout=600)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    continue  # the snapshotter holds it: now a snapshot of the namespace
                raise RegisterError(
                    f"containerd at {address}: layer {i + 1} of {image.name} ({chain}): "
                    f"{exc.details()}"
                ) from None
            stub.Remove(
                pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                metadata=header,
                timeout=60,
            )
            raise RegisterError(
                f"containerd's snapshotter {snapshotter!r} does not hold layer {i + 1} of "
                f"{image.name} ({chain}): is it `layerfs snapshotter serve` on this store?"
            )
        if chains:  # a view of the top layer waits for its chain's mount: the image is ready
            key = f"layerfs-ready-{time.time_ns()}"
            view = pb.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=chains[-1])
            stub.View(view, metadata=header, timeout=600)
            stub.Remove(
                pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                metadata=header,
                timeout=60,
            )


def register_image(
    image: ImageRecord,
    address: Path,
    namespace: str = "default",
    snapshotter: str = "layerfs",
    name: str = "",
) -> Registered:
    """Make ``image`` an image of containerd whose layers are the snapshotter's."""
    if not Path(address).is_socket():
        raise RegisterError(f"no containerd socket at {address}")
    ref = name or reference(image.name)
    chains = chain_ids([layer.diff_id for layer in image.layers])
    lease = f"layerfs-import-{uuid.uuid4().hex[:12]}"
    _ctr(address, namespace, "leases", "create", "--id", lease, "--expires", "1h")
    try:
        _provide_layers(address, namespace, lease, snapshotter, image, chains)
        with tempfile.TemporaryDirectory(prefix="layerfs-containerd-") as tmp:
            archive = Path(tmp) / "image.tar"
            manifest = oci_archive(image, ref, archive)
            _ctr(address, namespace, "images", "import", "--snapshotter", snapshotter, str(archive))
    finally:
        with contextlib.suppress(RegisterError):  # else it expires by itself
            _ctr(address, namespace, "leases", "delete", lease)
    return Registered(ref, manifest, chains)

"""Write an image of the store as an archive Docker or OCI tools load.

Two formats:

* ``docker`` - the legacy ``docker save`` layout that ``docker load`` reads:
  ``manifest.json``, ``repositories``, ``<config-hex>.json`` and one
  ``<hex>/layer.tar`` (with ``VERSION`` and ``json``) per layer.
* ``oci`` - an OCI image layout in a tar: ``oci-layout``, ``index.json`` and
  ``blobs/sha256/...`` holding the config, the manifest and uncompressed layers.

Layer tars are regenerated from the tree records (layerfs.layertar). Layers made
by ``layerfs commit`` come out byte for byte as committed, so their DiffIDs
hold. A layer imported from elsewhere may regenerate with other header bytes
(a different tar writer made it); then its sha256 differs from the recorded
DiffID, and since ``docker load`` checks every DiffID, the exported config
lists the DiffIDs of the tars actually written - the image then gets a new id.
The result says which layers were rewritten.

The archive is written next to its destination and renamed into place, so an
interrupted export never leaves a truncated file under the requested name.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from layerfs.catalog import ImageRecord
from layerfs.errors import LayerfsError
from layerfs.imageconfig import config_bytes, sha256_digest, with_diff_ids
from layerfs.layertar import write_layer
from layerfs.records import get_tree
from layerfs.store.chunks import ChunkStore

FORMATS = ("docker", "oci")
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
_MTIME = 0


class ExportError(LayerfsError):
    """The archive could not be written."""


@dataclass
class LayerFile:
    """One regenerated layer tar on disk."""

    path: Path
    diff_id: str
    size: int
    recorded_diff_id: str


@dataclass
class ExportResult:
    path: Path
    image_id: str
    rewritten: list[str] = field(default_factory=list)  # recorded DiffIDs that changed


def _split_tag(name: str) -> tuple[str, str]:
    repo, _, tag = name.rpartition(":")
    if not repo or "/" in tag:
        return name, "latest"
    return repo, tag


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = _MTIME
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mtime = _MTIME
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _write_layers(store: ChunkStore, image: ImageRecord, workdir: Path) -> list[LayerFile]:
    out = []
    for i, layer in enumerate(image.layers):
        entries, _ = get_tree(store, layer.tree)
        path = workdir / f"layer{i}.tar"
        with open(path, "wb") as f:
            digest = write_layer(entries, store, f)
        out.append(LayerFile(path, digest.diff_id, digest.size, layer.diff_id))
    return out


def _docker_archive(
    tar: tarfile.TarFile, name: str, config: bytes, config_id: str, layers: list[LayerFile]
) -> None:
    config_hex = config_id.removeprefix("sha256:")
    layer_paths = []
    parent = ""
    seen: set[str] = set()
    for layer in layers:
        # The legacy per-layer directory name is a v1 id chained over the DiffIDs.
        v1 = sha256_digest(f"{parent} {layer.diff_id}".encode()).removeprefix("sha256:")
        if v1 not in seen:
            seen.add(v1)
            _add_dir(tar, v1)
            _add_bytes(tar, f"{v1}/VERSION", b"1.0")
            meta = {"id": v1, **({"parent": parent} if parent else {})}
            _add_bytes(tar, f"{v1}/json", json.dumps(meta).encode())
            _add_file(tar, f"{v1}/layer.tar", layer.path)
        layer_paths.append(f"{v1}/layer.tar")
        parent = v1
    _add_bytes(tar, f"{config_hex}.json", config)
    repo, tag = _split_tag(name)
    manifest = [
        {"Config": f"{config_hex}.json", "RepoTags": [f"{repo}:{tag}"], "Layers": layer_paths}
    ]
    _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
    _add_bytes(tar, "repositories", json.dumps({repo: {tag: parent}}).encode())


def _oci_archive(
    tar: tarfile.TarFile, name: str, config: bytes, config_id: str, layers: list[LayerFile]
) -> None:
    repo, tag = _split_tag(name)
    descriptors = [(layer.diff_id, layer.size) for layer in layers]
    files = {layer.diff_id: layer.path for layer in layers}
    write_oci_layout(tar, f"{repo}:{tag}", tag, config, descriptors, files)


def write_oci_layout(
    tar: tarfile.TarFile,
    image_name: str,
    tag: str,
    config: bytes,
    layers: list[tuple[str, int]],
    layer_files: dict[str, Path] | None = None,
) -> str:
    """Write an OCI image layout into ``tar`` and return its manifest's digest.

    The manifest lists ``layers`` as uncompressed tars (DiffID, size), bottom first;
    ``layer_files`` gives the blobs to include by DiffID (none: an archive of the index,
    manifest and config only). The index names the image ``image_name``
    (``io.containerd.image.name``) with the tag ``tag``, if any.
    """
    config_id = sha256_digest(config)
    _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    _add_dir(tar, "blobs")
    _add_dir(tar, "blobs/sha256")
    for diff_id, path in (layer_files or {}).items():
        _add_file(tar, "blobs/sha256/" + diff_id.removeprefix("sha256:"), path)
    _add_bytes(tar, "blobs/sha256/" + config_id.removeprefix("sha256:"), config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_id, "size": len(config)},
        "layers": [
            {"mediaType": MT_LAYER, "digest": diff_id, "size": size} for diff_id, size in layers
        ],
    }
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    manifest_id = sha256_digest(manifest_bytes)
    _add_bytes(tar, "blobs/sha256/" + manifest_id.removeprefix("sha256:"), manifest_bytes)
    annotations = {"io.containerd.image.name": image_name}
    if tag:
        annotations["org.opencontainers.image.ref.name"] = tag
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": manifest_id,
                "size": len(manifest_bytes),
                "annotations": annotations,
            }
        ],
    }
    _add_bytes(tar, "index.json", json.dumps(index).encode())
    return manifest_id


def export_image(
    store: ChunkStore, image: ImageRecord, dest: Path, fmt: str = "docker", name: str = ""
) -> ExportResult:
    """Write ``image`` to the archive ``dest`` in format ``fmt`` ('docker' or 'oci')."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    dest = Path(dest).absolute()
    if not dest.parent.is_dir():
        raise ExportError(f"cannot write {dest}: the directory {dest.parent} does not exist")
    try:
        with tempfile.TemporaryDirectory(prefix=".layerfs-export-", dir=dest.parent) as tmp:
            layers = _write_layers(store, image, Path(tmp))
            rewritten = [lf.recorded_diff_id for lf in layers if lf.diff_id != lf.recorded_diff_id]
            config = image.config
            recorded = config.get("rootfs", {}).get("diff_ids")
            actual = [lf.diff_id for lf in layers]
            if recorded != actual:
                config = with_diff_ids(config, actual)
            data = config_bytes(config)
            config_id = sha256_digest(data)
            part = Path(tmp) / "archive.tar"
            with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
                writer = _oci_archive if fmt == "oci" else _docker_archive
                writer(tar, name or image.name, data, config_id, layers)
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
    except OSError as exc:
        raise ExportError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    return ExportResult(dest, config_id, rewritten)

"""Image layouts to an import plan: which config, which layers in which order, which names.

Understood layouts:

* ``docker save`` legacy: manifest.json + ``<id>/layer.tar`` + ``<hex>.json`` config;
* Docker 25+ ``docker save``: an OCI layout plus a manifest.json into blobs/sha256/;
* OCI image layout (directory or tar): oci-layout, index.json, blobs/<alg>/<hex>.

Every digest the layout states (manifest, config, layer blobs) is checked: small
documents here, layer blobs while they stream through the importer.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass, field

from layerfs.errors import ImportRejected
from layerfs.formats.source import Source, read_member

INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
CONFIG_TYPES = {
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_CONFIG_RE = re.compile(r"^([0-9a-f]{64})\.json$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


@dataclass
class LayerRef:
    """Where one layer is in the archive and what its bytes must hash to."""

    index: int  # 1-based, bottom first
    member: str
    diff_id: str  # from the image config
    digest: str | None = None  # blob digest, when the layout states one
    size: int | None = None  # blob size, when the layout states one
    media_type: str = ""

    @property
    def label(self) -> str:
        return f"layer {self.index} ({self.member})"


@dataclass
class ImagePlan:
    """Everything needed to import one image from an archive."""

    layout: str  # "docker-save", "docker-oci" or "oci"
    config: dict
    image_id: str  # "sha256:<hex>" of the config bytes
    layers: list[LayerRef]
    names: list[str] = field(default_factory=list)


def read_plan(source: Source, want: str | None = None) -> ImagePlan:
    """Work out the import plan of the archive ``source``; ``want`` picks among several."""
    has_manifest = source.exists("manifest.json")
    if source.exists("index.json") and source.exists("oci-layout"):
        plan = _oci_plan(source, want)
        if has_manifest:
            plan.layout = "docker-oci"
            entries = _docker_manifest(source)
            tags = [
                t
                for e in entries
                if e.get("Config", "").endswith(plan.image_id[7:])
                for t in e.get("RepoTags") or []
            ]
            plan.names = tags + plan.names
        return plan
    if has_manifest:
        return _docker_plan(source, want)
    raise ImportRejected(
        f"{source.location}: not an image archive (no manifest.json, no index.json and "
        "oci-layout); expected `docker save` output or an OCI image layout"
    )


def _json(source: Source, name: str, data: bytes | None = None) -> object:
    try:
        return json.loads(data if data is not None else read_member(source, name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportRejected(f"{source.location}: {name} is not valid JSON ({exc})") from exc


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _config(source: Source, member: str, expect: str | None) -> tuple[dict, str]:
    data = read_member(source, member)
    image_id = _sha256(data)
    if expect is not None and image_id != expect:
        raise ImportRejected(
            f"{source.location}: the image config {member} has digest {image_id}, but the "
            f"manifest says {expect}; the archive is damaged or was altered"
        )
    config = _json(source, member, data)
    if not isinstance(config, dict):
        raise ImportRejected(f"{source.location}: the image config {member} is not an object")
    return config, image_id


def _diff_ids(source: Source, config: dict, count: int) -> list[str]:
    rootfs = config.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids")
    if rootfs.get("type") != "layers" or not isinstance(diff_ids, list):
        raise ImportRejected(f"{source.location}: the image config has no rootfs.diff_ids")
    for d in diff_ids:
        if not isinstance(d, str) or not _DIGEST_RE.match(d):
            raise ImportRejected(f"{source.location}: the image config lists a bad DiffID {d!r}")
    if len(diff_ids) != count:
        raise ImportRejected(
            f"{source.location}: the manifest lists {count} layers but the image config "
            f"lists {len(diff_ids)} DiffIDs"
        )
    return diff_ids


# -- docker save -------------------------------------------------------------------------


def _docker_manifest(source: Source) -> list[dict]:
    entries = _json(source, "manifest.json")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ImportRejected(f"{source.location}: manifest.json is not a list of images")
    return entries


def _docker_plan(source: Source, want: str | None) -> ImagePlan:
    entries = _docker_manifest(source)
    entry = _choose(source, entries, want, lambda e: e.get("RepoTags") or [])
    config_name = entry.get("Config")
    layers = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layers, list):
        raise ImportRejected(f"{source.location}: manifest.json lacks Config or Layers")
    config, image_id = _config(source, config_name, _digest_in_name(config_name))
    diff_ids = _diff_ids(source, config, len(layers))
    refs = []
    for i, (member, diff_id) in enumerate(zip(layers, diff_ids, strict=True), start=1):
        if not isinstance(member, str):
            raise ImportRejected(f"{source.location}: manifest.json lists a bad layer {member!r}")
        blob = _BLOB_RE.match(member)
        refs.append(LayerRef(i, member, diff_id, "sha256:" + blob.group(1) if blob else None))
    return ImagePlan("docker-save", config, image_id, refs, list(entry.get("RepoTags") or []))


def _digest_in_name(member: str) -> str | None:
    m = _BLOB_RE.match(member) or _CONFIG_RE.match(member)
    return "sha256:" + m.group(1) if m else None


# -- OCI layout --------------------------------------------------------------------------


def _blob(source: Source, desc: dict, what: str) -> bytes:
    digest = desc.get("digest")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ImportRejected(
            f"{source.location}: the {what} has an unsupported digest {digest!r} "
            "(only sha256 is understood)"
        )
    member = "blobs/sha256/" + digest[7:]
    data = read_member(source, member)
    if _sha256(data) != digest or ("size" in desc and desc["size"] != len(data)):
        raise ImportRejected(
            f"{source.location}: the {what} {member} does not match its digest or size; "
            "the archive is damaged or was altered"
        )
    return data


def _names(desc: dict) -> list[str]:
    notes = desc.get("annotations") or {}
    names = [notes.get("io.containerd.image.name"), notes.get("org.opencontainers.image.ref.name")]
    return [n for n in names if isinstance(n, str) and n]


def _platform_ok(desc: dict) -> bool:
    plat = desc.get("platform")
    if not isinstance(plat, dict):
        return True
    arch = _ARCH.get(platform.machine(), platform.machine())
    return plat.get("os", "linux") == "linux" and plat.get("architecture", arch) == arch


def _oci_plan(source: Source, want: str | None) -> ImagePlan:
    index = _json(source, "index.json")
    if not isinstance(index, dict):
        raise ImportRejected(f"{source.location}: index.json is not an object")
    candidates = _manifests(source, index, [], depth=0)
    desc, names = _choose(source, candidates, want, lambda c: c[1])
    manifest = _json(source, "manifest", _blob(source, desc, "image manifest"))
    if not isinstance(manifest, dict):
        raise ImportRejected(f"{source.location}: the image manifest is not an object")
    cdesc = manifest.get("config") or {}
    if cdesc.get("mediaType") not in CONFIG_TYPES:
        raise ImportRejected(
            f"{source.location}: unknown image config media type {cdesc.get('mediaType')!r}"
        )
    config, image_id = _config(source, "blobs/sha256/" + _checked(source, cdesc), cdesc["digest"])
    layer_descs = manifest.get("layers")
    if not isinstance(layer_descs, list):
        raise ImportRejected(f"{source.location}: the image manifest lists no layers")
    diff_ids = _diff_ids(source, config, len(layer_descs))
    refs = []
    for i, (ld, diff_id) in enumerate(zip(layer_descs, diff_ids, strict=True), start=1):
        media = ld.get("mediaType") if isinstance(ld, dict) else None
        hexd = _checked(source, ld) if isinstance(ld, dict) else ""
        ref = LayerRef(i, f"blobs/sha256/{hexd}", diff_id, f"sha256:{hexd}", ld.get("size"), media)
        if media not in LAYER_TYPES:
            raise ImportRejected(
                f"{source.location}: {ref.label}: unknown layer media type {media!r}"
            )
        refs.append(ref)
    return ImagePlan("oci", config, image_id, refs, names)


def _checked(source: Source, desc: dict) -> str:
    digest = desc.get("digest")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ImportRejected(
            f"{source.location}: unsupported digest {digest!r} (only sha256 is understood)"
        )
    return digest[7:]


def _manifests(
    source: Source, index: dict, names: list[str], depth: int
) -> list[tuple[dict, list[str]]]:
    """Image manifest descriptors reachable from an index, with the names they carry."""
    if depth > 4:
        raise ImportRejected(f"{source.location}: image indexes nest too deeply")
    found: list[tuple[dict, list[str]]] = []
    for desc in index.get("manifests") or []:
        if not isinstance(desc, dict):
            continue
        media = desc.get("mediaType")
        here = _names(desc) or names
        if media in MANIFEST_TYPES:
            if _platform_ok(desc):
                found.append((desc, here))
        elif media in INDEX_TYPES:
            child = _json(source, "image index", _blob(source, desc, "image index"))
            if isinstance(child, dict):
                found.extend(_manifests(source, child, here, depth + 1))
        else:
            raise ImportRejected(f"{source.location}: index.json: unknown media type {media!r}")
    return found


def _choose(source: Source, items: list, want: str | None, names_of) -> object:
    if len(items) == 1:
        return items[0]
    if not items:
        raise ImportRejected(f"{source.location}: the archive holds no image for this platform")
    if want is not None:
        hits = [i for i in items if want in names_of(i)]
        if len(hits) == 1:
            return hits[0]
    raise ImportRejected(
        f"{source.location}: the archive holds {len(items)} images; name the one to import "
        "with --tag (one of its own names)"
    )

"""The image catalog: which images the store holds and the layers they are made of.

Each image is a doc ``images/<name>.json``; each imported layer is a doc
``layers/<diffid-hex>.json`` pointing at the layer's tree record, so a layer
shared by several images is imported and stored once. Docs are written only
after every blob they reference is durable, so a killed import leaves nothing
listed. Images own their layers' trees (gc's roots); a layer doc only lets an
import reuse a layer, and goes with the last image that uses it. An import that
reused a layer doc meanwhile still writes its image (the tree is there until a
gc, which waits for the import's lock); a later import stores the layer again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from layerfs.errors import ImageNotFound, ObjectMissing, StoreError
from layerfs.store.backend import Backend


@dataclass
class LayerRecord:
    """One imported layer: its DiffID, its tree record and its figures."""

    diff_id: str  # "sha256:..." of the uncompressed tar
    tree: str  # digest of the layer's tree record in the store
    entries: int = 0
    apparent_size: int = 0  # sum of regular file sizes
    stored_bytes: int = 0  # bytes this layer added to the store when first imported


@dataclass
class ImageRecord:
    """One named image: its config and its layers, bottom first."""

    name: str
    id: str  # "sha256:..." of the image config
    config: dict
    layers: list[LayerRecord]
    created: float = field(default_factory=time.time)
    added_bytes: int = 0  # bytes this image added to the store when imported
    source: str = ""

    @property
    def apparent_size(self) -> int:
        return sum(layer.apparent_size for layer in self.layers)


def _image_doc(name: str) -> str:
    return f"images/{name}.json"


def _layer_doc(diff_id: str) -> str:
    return "layers/" + diff_id.replace(":", "-") + ".json"


class Catalog:
    """Read and write image and layer records in a backend's docs."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def put_layer(self, layer: LayerRecord) -> None:
        self.backend.put_doc(_layer_doc(layer.diff_id), json.dumps(asdict(layer)).encode())

    def get_layer(self, diff_id: str) -> LayerRecord | None:
        try:
            return LayerRecord(**json.loads(self.backend.get_doc(_layer_doc(diff_id))))
        except ObjectMissing:
            return None

    def put_image(self, image: ImageRecord) -> None:
        doc = asdict(image)
        self.backend.put_doc(_image_doc(image.name), json.dumps(doc).encode())

    def _load(self, doc_name: str) -> ImageRecord:
        d = json.loads(self.backend.get_doc(doc_name))
        d["layers"] = [LayerRecord(**layer) for layer in d["layers"]]
        return ImageRecord(**d)

    def images(self) -> list[ImageRecord]:
        return [self._load(n) for n in self.backend.list_docs("images/") if n.endswith(".json")]

    def get_image(self, name_or_id: str) -> ImageRecord:
        """Find an image by name, by full id, or by a unique id prefix."""
        try:
            return self._load(_image_doc(name_or_id))
        except (ObjectMissing, StoreError):
            pass
        if ":" not in name_or_id:
            try:
                return self._load(_image_doc(name_or_id + ":latest"))
            except ObjectMissing:
                pass
        key = name_or_id.removeprefix("sha256:")
        matches = [i for i in self.images() if i.id.removeprefix("sha256:").startswith(key)]
        if len(key) >= 6 and len({m.id for m in matches}) == 1:
            return matches[0]
        raise ImageNotFound(f"no image named {name_or_id!r} in the store {self.backend.url}")

    def remove_image(self, name: str) -> tuple[ImageRecord, list[str]]:
        """Remove an image, and the docs of its layers no other image uses.

        Returns the image and the DiffIDs of the layers removed with it; their
        objects stay until a gc.
        """
        image = self.get_image(name)
        self.backend.delete_doc(_image_doc(image.name))
        used = {layer.diff_id for other in self.images() for layer in other.layers}
        gone = sorted({layer.diff_id for layer in image.layers} - used)
        for diff_id in gone:
            self.backend.delete_doc(_layer_doc(diff_id))
        return image, gone

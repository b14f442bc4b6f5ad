"""Chain IDs: the names containerd gives unpacked layers, and the layers of the store they name.

A layer's chain ID is its DiffID for the bottom layer, then
``sha256(PARENT-CHAIN-ID + " " + DIFFID)`` (OCI image spec): it names a layer
together with everything below it. containerd commits an unpacked layer under
its chain ID (the backend name is ``NAMESPACE/N/CHAINID`` and the key it
commits ``NAMESPACE/N/extract-UNIQUE CHAINID``), and its pull unpacker labels
the snapshot ``containerd.io/snapshot.ref`` = CHAINID. The store's images
list their layers' DiffIDs, so the chain IDs of every layer the store holds
are known without reading a layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.catalog import LayerRecord

if TYPE_CHECKING:
    from layerfs.store.chunks import ChunkStore

SNAPSHOT_REF = "containerd.io/snapshot.ref"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_unpack_key(key: str) -> bool:
    """Whether ``key`` is one containerd's unpackers prepare a layer under
    (``.../extract-UNIQUE CHAINID``): a Commit follows once the layer is applied."""
    return key.rsplit("/", 1)[-1].startswith("extract-")


def unpacked_chain_id(name: str, key: str, labels: dict[str, str]) -> str:
    """The chain ID of the layer committed as ``name`` from ``key``, if containerd's
    unpackers committed it (else ""): the ``containerd.io/snapshot.ref`` label, or an
    unpack key ``.../extract-UNIQUE CHAINID`` committed as ``.../CHAINID``."""
    ref = labels.get(SNAPSHOT_REF, "")
    if _DIGEST.fullmatch(ref):
        return ref
    last_key = key.rsplit("/", 1)[-1]
    chain = name.rsplit("/", 1)[-1]
    if (
        last_key.startswith("extract-")
        and _DIGEST.fullmatch(chain)
        and last_key.endswith(f" {chain}")
    ):
        return chain
    return ""


@dataclass(frozen=True)
class StoreLayer:
    """A layer of one of the store's images, named by its chain ID."""

    chain_id: str
    parent_chain_id: str  # "" for a bottom layer
    layer: LayerRecord
    image: str  # the first image found holding it


def store_layers(store: ChunkStore) -> dict[str, StoreLayer]:
    """Every layer of the store's images by chain ID (computed from their DiffIDs)."""
    from layerfs.catalog import Catalog
    from layerfs.imageconfig import chain_ids

    found: dict[str, StoreLayer] = {}
    for image in Catalog(store.backend).images():
        chains = chain_ids([layer.diff_id for layer in image.layers])
        for i, (chain, layer) in enumerate(zip(chains, image.layers, strict=True)):
            if chain not in found:
                found[chain] = StoreLayer(chain, chains[i - 1] if i else "", layer, image.name)
    return found

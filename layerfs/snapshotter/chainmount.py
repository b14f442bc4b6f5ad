"""Helper process: mount a chain of layers read-only, as an image is mounted.

``python -m layerfs.snapshotter.chainmount STORE_URL MOUNTPOINT`` reads
``{"name": ..., "layers": [LayerRecord...]}`` on stdin and mounts those layers
(bottom first) at MOUNTPOINT with layerfs.fs.service.mount_image, which starts
the store's view daemon if none runs. It runs apart from the snapshotter so
that the daemon is forked from a single-threaded process. Errors: one line on
stderr, exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from layerfs.memory import return_large_buffers


def main(argv: list[str]) -> int:
    return_large_buffers()
    from layerfs.catalog import LayerRecord
    from layerfs.errors import LayerfsError
    from layerfs.fs.service import mount_image
    from layerfs.snapshotter.layers import chain_record
    from layerfs.store.location import open_store

    store_url, mountpoint = argv
    request = json.loads(sys.stdin.read())
    layers = [LayerRecord(**layer) for layer in request["layers"]]
    try:
        store = open_store(store_url)
        mount_image(store_url, store, chain_record(request["name"], layers), Path(mountpoint), None)
    except LayerfsError as exc:
        print(f"layerfs: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import os

    sys.stdout.flush()
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the view daemon serves on; nothing here needs tearing down

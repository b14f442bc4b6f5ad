"""Helper process: the snapshotter's work on the store, apart from the long-lived server.

``python -m layerfs.snapshotter.storework STORE_URL`` reads one JSON request
on stdin, does it and writes one JSON answer line on stdout:

- ``{"op": "check"}``: the store opens; answers ``{}``.
- ``{"op": "commit", "upper", "mountpoint", "lowers", "holder", "chain_id"}``:
  store the applied upper as a layer and pin it (layerfs.snapshotter.layers
  .commit_upper); answers ``{"layer": LayerRecord, "pin": ID}``.
- ``{"op": "provide", "target", "parent_chain", "holder", "layer"}``: pin the
  layer of chain ID ``target`` over ``parent_chain`` if the store holds it
  (``layer``: one committed here before, found by the server; else the
  store's images are searched); answers ``{"layer": ..., "pin": ...}`` or
  ``{"layer": null}``.
- ``{"op": "unpin", "pin": ID}``: answers ``{}``.

The helper imports what it needs and opens the store (an encrypted store's
key derivation) before it reads the request, so the server can start one
ahead: when containerd prepares an unpack, a helper is made ready while the
layer is applied, and the Commit that follows hands it its request (one that
gets none within SPARE_WAIT, or sees its stdin closed, exits).

Before pinning for a holder, pins left for that same holder (by a helper
killed after pinning, before the server recorded the snapshot) are removed:
the server asks only for names no snapshot has. Reading an upper, chunking
and storing it leaves a heap of tens of MiB that a Python process keeps; in a
helper it goes when the helper exits, and the gRPC server never imports the
store. A failure is one line ``{"error": MESSAGE, "code": CODE}`` (CODE one of
the layerfs.snapshotter.metadata errors, or ``Internal``), exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from layerfs.memory import return_large_buffers

# A test's hook: while this file exists, a commit stops itself (SIGSTOP) after
# pinning, before answering, so that the test can kill it at its worst moment.
PAUSE_FILE_VARIABLE = "LAYERFS_SNAPSHOTTER_TEST_PAUSE_COMMIT"
SPARE_WAIT = 600.0  # seconds a helper started ahead waits for its request


def _pin_for(store: Any, tree: str, holder: str) -> str:
    """Pin ``tree`` for ``holder``, dropping pins an earlier attempt left for that holder
    (call under the store's shared lock)."""
    from layerfs.maintenance.pins import list_pins, pin, unpin

    for stale in list_pins(store.backend):
        if stale.holder == holder:
            unpin(store.backend, stale.id)
    return pin(store.backend, tree, holder).id


def _commit(store: Any, request: dict[str, Any]) -> dict[str, Any]:
    from layerfs.catalog import LayerRecord
    from layerfs.snapshotter.layers import commit_upper

    holder = request["holder"]
    with store.backend.lock(exclusive=False):  # no gc between storing and pinning
        layer = commit_upper(
            store,
            Path(request["upper"]),
            Path(request["mountpoint"]),
            [LayerRecord(**lower) for lower in request["lowers"]],
            holder,
            request.get("chain_id", ""),
        )
        pin_id = _pin_for(store, layer.tree, holder)
    pause = os.environ.get(PAUSE_FILE_VARIABLE, "")
    if pause and os.path.exists(pause):
        os.kill(os.getpid(), signal.SIGSTOP)
    return {"layer": asdict(layer), "pin": pin_id}


def _provide(store: Any, request: dict[str, Any]) -> dict[str, Any]:
    from layerfs.catalog import LayerRecord
    from layerfs.snapshotter.chains import store_layers

    with store.backend.lock(exclusive=False):  # no gc between finding and pinning
        if request.get("layer"):
            layer = LayerRecord(**request["layer"])
        else:
            found = store_layers(store).get(request["target"])
            if found is None or found.parent_chain_id != request["parent_chain"]:
                return {"layer": None}
            layer = found.layer
        pin_id = _pin_for(store, layer.tree, request["holder"])
    return {"layer": asdict(layer), "pin": pin_id}


def _unpin(store: Any, request: dict[str, Any]) -> dict[str, Any]:
    from layerfs.maintenance.pins import unpin

    unpin(store.backend, request["pin"])
    return {}


def main(argv: list[str]) -> int:
    return_large_buffers()
    import logging
    import select

    from layerfs.errors import LayerfsError
    from layerfs.store.location import open_store

    logging.basicConfig(
        level=logging.INFO, format="layerfs: %(levelname)s: store helper: %(message)s"
    )
    (store_url,) = argv
    ops = {"check": lambda s, r: {}, "commit": _commit, "provide": _provide, "unpin": _unpin}
    try:
        # imports and the store's opening (its key derivation) come before the request:
        # a helper started ahead of a commit has done them while containerd applied
        import layerfs.changeset  # noqa: F401
        import layerfs.maintenance.pins  # noqa: F401
        import layerfs.snapshotter.layers  # noqa: F401

        store = open_store(store_url)
        if not select.select([sys.stdin], [], [], SPARE_WAIT)[0]:
            return 0  # started ahead of a commit that never came
        text = sys.stdin.read()
        if not text:
            return 0  # the server closed it unused
        request = json.loads(text)
        answer = ops[request["op"]](store, request)
    except LayerfsError as exc:
        code = type(exc).__name__
        known = ("NotFound", "AlreadyExists", "FailedPrecondition", "InvalidArgument")
        print(json.dumps({"error": str(exc), "code": code if code in known else "Internal"}))
        return 1
    except OSError as exc:
        print(json.dumps({"error": str(exc), "code": "Internal"}))
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

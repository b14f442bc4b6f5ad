"""The upper DIR of a writable image mount: its layout and the record of its image.

``layerfs mount IMAGE MNT --upper DIR`` keeps its changes in DIR:

* ``DIR/upper/``: the upper tree, in kernel overlayfs' own format (whiteouts,
  opaque and redirected directories, metacopy files; names in
  layerfs.union.vocab, reading in layerfs.union.upper);
* ``DIR/work/``: overlayfs' workdir;
* ``DIR/layerfs.json``: ``{"format": 2, "image": NAME, "image_id": "sha256:..."}``,
  the image the changes belong to. Mounting DIR over another image is refused,
  and so is a DIR of format 1 (written by layerfs' former FUSE engine, whose
  upper tree kernel overlayfs does not read the same way).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import LayerfsError

FORMAT = 2
META_FILE = "layerfs.json"


class UpperError(LayerfsError):
    """The upper directory cannot be used."""


@dataclass(frozen=True)
class UpperDirs:
    """Where a writable mount keeps its changes."""

    tree: Path  # the upper tree
    work: Path  # the workdir
    image: str | None = None
    image_id: str | None = None


def image_upper(base: Path, image: str, image_id: str) -> UpperDirs:
    """Create or reopen the upper DIR for an image; refuse another image's DIR or format."""
    base = Path(base).absolute()
    meta = base / META_FILE
    try:
        base.mkdir(parents=True, exist_ok=True)
        if meta.exists():
            doc = json.loads(meta.read_text())
            if doc.get("image_id") != image_id:
                raise UpperError(
                    f"upper directory {base} holds changes to image {doc.get('image')} "
                    f"({doc.get('image_id')}), not {image}: use another --upper directory"
                )
            if doc.get("format") != FORMAT:
                raise UpperError(
                    f"upper directory {base} was written in upper format {doc.get('format')}, "
                    f"not {FORMAT}: commit it with an older layerfs, or start a new "
                    "--upper directory"
                )
        else:
            doc = {"format": FORMAT, "image": image, "image_id": image_id}
            tmp = base / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, meta)
        (base / "upper").mkdir(exist_ok=True)
        (base / "work").mkdir(exist_ok=True)
    except (OSError, ValueError) as exc:
        raise UpperError(f"cannot use {base} as upper directory: {exc}") from exc
    return UpperDirs(base / "upper", base / "work", image, image_id)


def upper_image_id(base: Path) -> str | None:
    """The id of the image an upper DIR holds changes to, from its record (None if unreadable)."""
    try:
        value = json.loads((Path(base) / META_FILE).read_text()).get("image_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None

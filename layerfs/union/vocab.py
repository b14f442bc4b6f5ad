"""The names overlayfs and OCI layer tars use to mark deletions, opaque directories, redirects
and metacopy files.

OCI layer tars mark changes with file names:

* ``DIR/.wh.NAME`` deletes ``DIR/NAME`` from the layers below (a *whiteout*);
* ``DIR/.wh..wh..opq`` makes ``DIR`` *opaque*: no lower child shows through it;
* any other ``.wh..wh.*`` name is metadata of the tool that wrote the layer
  (aufs' ``.wh..wh.plnk``, ...): it is skipped, never shown.

An overlayfs upper directory (a writable mount's, layerfs.fs.upper) marks
them with file types and xattrs:

* a character device 0/0 is a whiteout of its own name;
* ``trusted.overlay.opaque`` = ``y`` on a directory makes it opaque;
* ``trusted.overlay.redirect`` = ``/PATH`` (from the root) or ``NAME`` (in the
  parent's lower directory) names the lower entry a renamed one came from;
* ``trusted.overlay.metacopy`` marks a file whose upper copy holds only
  metadata, its bytes still being those of the lower file;
* ``trusted.overlay.origin`` is the kernel's handle of the lower entry an upper
  one was copied up from (layerfs never writes it).

The ``trusted.overlay.*`` and layerfs' own ``trusted.layerfs.*`` xattrs are
private: a mount never shows them, and a commit leaves them out together with
their unprivileged ``user.*`` forms.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum

# -- OCI layer tars: names ---------------------------------------------------------

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_META_PREFIX = ".wh..wh."  # OPAQUE_MARKER, or metadata to skip

# -- overlayfs: file types and xattrs ----------------------------------------------

WHITEOUT_MODE = stat.S_IFCHR  # a whiteout is a character device ...
WHITEOUT_RDEV = 0  # ... numbered 0/0 (os.makedev(0, 0))
OVERLAY_XATTR_PREFIX = "trusted.overlay."
LAYERFS_XATTR_PREFIX = "trusted.layerfs."
XATTR_OPAQUE = "trusted.overlay.opaque"
OPAQUE_VALUE = b"y"  # XATTR_OPAQUE's value on an opaque directory
XATTR_REDIRECT = "trusted.overlay.redirect"
XATTR_METACOPY = "trusted.overlay.metacopy"
XATTR_ORIGIN = "trusted.overlay.origin"
# never shown through a mount
PRIVATE_XATTR_PREFIXES = (LAYERFS_XATTR_PREFIX, OVERLAY_XATTR_PREFIX)
# never committed to a layer: the private ones and their user.* forms
UNCOMMITTED_XATTR_PREFIXES = (*PRIVATE_XATTR_PREFIXES, "user.overlay.", "user.layerfs.")


class NameKind(Enum):
    """What an entry's name says about it in an OCI layer tar."""

    PLAIN = "plain"  # an ordinary entry
    WHITEOUT = "whiteout"  # ".wh.NAME": deletes NAME from the layers below
    OPAQUE = "opaque"  # ".wh..wh..opq": its directory hides every lower child
    META = "meta"  # any other ".wh..wh.*" name: metadata, skipped


@dataclass(frozen=True, slots=True)
class MemberName:
    """An OCI layer tar member's base name, parsed."""

    kind: NameKind
    hidden: str = ""  # WHITEOUT: the name it deletes; "" for every other kind


_PLAIN = MemberName(NameKind.PLAIN)
_OPAQUE = MemberName(NameKind.OPAQUE)
_META = MemberName(NameKind.META)


def parse_member_name(base: str) -> MemberName:
    """What the base name ``base`` (no ``/``) of a layer entry marks; see the module docstring."""
    if not base.startswith(WHITEOUT_PREFIX):
        return _PLAIN
    if base == OPAQUE_MARKER:
        return _OPAQUE
    if base.startswith(WHITEOUT_META_PREFIX):
        return _META
    return MemberName(NameKind.WHITEOUT, base[len(WHITEOUT_PREFIX) :])


def whiteout_name(name: str) -> str:
    """The base name of the whiteout that deletes ``name``: ``.wh.NAME``."""
    return WHITEOUT_PREFIX + name


def is_whiteout_stat(st: os.stat_result) -> bool:
    """Whether ``st`` is an overlayfs whiteout: a character device 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_RDEV


def is_private_xattr(name: str) -> bool:
    """Whether the xattr ``name`` is overlayfs' or layerfs' own, never shown through a mount."""
    return name.startswith(PRIVATE_XATTR_PREFIXES)

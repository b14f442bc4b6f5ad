"""The FUSE side of layerfs: read-only image mounts and writable copy-on-write mounts.

fusepy finds libfuse with ctypes.util.find_library, which runs `ldconfig -p`
in a subprocess on every start. When the usual soname loads, it is handed to
fusepy through FUSE_LIBRARY_PATH instead, so a mount starts without that fork.
"""

import ctypes
import os

if "FUSE_LIBRARY_PATH" not in os.environ:
    try:
        ctypes.CDLL("libfuse.so.2")
    except OSError:
        pass  # fusepy searches on its own and reports what it cannot find
    else:
        os.environ["FUSE_LIBRARY_PATH"] = "libfuse.so.2"

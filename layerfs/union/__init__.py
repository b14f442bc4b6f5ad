"""The union model shared by every layer of layerfs.

* :mod:`layerfs.union.vocab` - the names overlayfs and OCI layer tars use for
  whiteouts, opaque directories, redirects and metacopy files.
* :mod:`layerfs.union.upper` - reading an overlayfs upper directory: what each
  entry is and which lower entry it stands on.
"""

"""The local content cache: every regular file's bytes, decompressed, once per content.

Kernel overlayfs reads the bytes of an image's files from here (a data-only
lower layer), so reads never pass through Python once content is cached.
"""

from layerfs.content.cache import ContentCache, content_id

__all__ = ["ContentCache", "content_id"]

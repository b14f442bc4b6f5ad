"""Where the store lives: the default location and opening a store from a URL.

A plain path (or ``file://`` URL) is a local directory store; ``s3://BUCKET/PREFIX``
is an S3 store. The default is ``$LAYERFS_STORE``, else ``/var/lib/layerfs`` for
root and ``~/.local/share/layerfs`` for everyone else.

``open_backend`` opens the store as a repository (layerfs.repo.repository):
encrypted ones need the password. A new local store becomes an unencrypted
repository when no password is given (the zero-config default); a new S3 store
needs a password or ``layerfs init --insecure-no-encryption``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from layerfs.errors import StoreError

if TYPE_CHECKING:
    from layerfs.store.backend import Backend
    from layerfs.store.chunks import ChunkStore


def default_store_url() -> str:
    env = os.environ.get("LAYERFS_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/layerfs"
    return str(Path.home() / ".local" / "share" / "layerfs")


def open_backend(url: str | None = None, *, password_file: str | None = None) -> Backend:
    """Open the repository a URL names (the default store when None)."""
    from layerfs.repo.repository import open_repository

    raw = open_raw_backend(url)
    try:
        return open_repository(
            raw,
            password_file=password_file,
            allow_unencrypted_create=not raw.url.startswith("s3://"),
        )
    except BaseException:
        raw.close()
        raise


def open_raw_backend(url: str | None = None) -> Backend:
    """The backend a URL names, as stored: no repository config read, nothing decrypted."""
    url = url or default_store_url()
    if url.startswith("s3://"):
        try:
            from layerfs.store.s3 import S3Backend
        except ImportError as exc:  # pragma: no cover
            raise StoreError(f"S3 stores are not available: {exc}") from exc
        return S3Backend.from_url(url)
    root = local_root(url)
    if root is None:
        raise StoreError(f"unsupported store URL {url!r}: use a path or s3://BUCKET/PREFIX")
    from layerfs.store.local import LocalBackend

    return LocalBackend(root)


def local_root(url: str | None = None) -> Path | None:
    """The directory of the local store a URL names (None for an S3 store)."""
    url = url or default_store_url()
    if "://" in url and not url.startswith("file://"):
        return None
    return Path(url.removeprefix("file://")).absolute()


def local_cache_dir(root: Path) -> Path:
    """The cache directory of the local store in ``root`` (indexes, content cache)."""
    return root / "cache"


def open_store(url: str | None = None) -> ChunkStore:
    """Open a ChunkStore over the backend a URL names."""
    from layerfs.store.chunks import ChunkStore

    return ChunkStore(open_backend(url))

"""Repositories for tests: stores that share one key, so equal content gets equal IDs.

Content IDs are keyed by the repository's master key, so two repositories name
the same bytes differently. Tests that compare what two imports produced open
the second store with the first one's config and key files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from layerfs.store.chunks import ChunkStore
from layerfs.store.location import open_store


def same_key_store(first: Path, second: Path) -> ChunkStore:
    """A new local store at ``second`` with the repository key of ``first`` (made if needed)."""
    open_store(str(first)).flush()  # makes ``first`` a repository
    docs = second / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy2(first / "docs" / "config", docs / "config")
    if (first / "docs" / "keys").is_dir():
        shutil.copytree(first / "docs" / "keys", docs / "keys", dirs_exist_ok=True)
    return open_store(str(second))

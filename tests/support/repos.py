"""Repositories for tests: password files and environments, tiny archives, and
stores that share one key.

Content IDs are keyed by the repository's master key, so two repositories name
the same bytes differently. Tests that compare what two imports produced open
the second store with the first one's config and key files (same_key_store).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
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


LAYERFS = str(Path(sys.executable).parent / "layerfs")
PASSWORD_VARIABLES = (
    "LAYERFS_PASSWORD_FILE",
    "LAYERFS_PASSWORD_COMMAND",
    "CREDENTIALS_DIRECTORY",
    "LAYERFS_STORE",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any password source or store, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in PASSWORD_VARIABLES}
    env["LAYERFS_TESTONLY_WEAKEN_KDF"] = "1"
    env.update(extra)
    return env


def password_file(tmp_path: Path, name: str, secret: str) -> Path:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def tiny_archive(dest: Path, tag: str, text: bytes) -> Path:
    """A one-layer `docker save` archive holding /hello.txt, made without Docker."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(text), 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(text))
    return saved_archive(dest, tag, layer.getvalue())


def saved_archive(dest: Path, tag: str, layer_bytes: bytes) -> Path:
    """A one-layer `docker save` archive of the layer tar ``layer_bytes``, made without Docker."""
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = hashlib.sha256(layer_bytes).hexdigest() + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}])
    with tarfile.open(dest, "w") as tar:
        for name, data in (
            (config_name, config),
            (layer_name, layer_bytes),
            ("manifest.json", manifest.encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest

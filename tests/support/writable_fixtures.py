"""The `store` and `m` fixtures shared by the writable-mount test modules.

A test module uses them by naming this module in its `pytest_plugins`.
`m` runs each test on both mount modes ("image": a kernel overlay over the
image's view; "overlay": plain directories mounted with kernel overlayfs, see
tests.support.writable.mounted_as) over one store per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.writable import fuse_store, mounted_as


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return fuse_store(tmp_path_factory)


@pytest.fixture(params=["image", "overlay"])
def m(request, store):
    with mounted_as(request.param, store) as mnt:
        yield mnt

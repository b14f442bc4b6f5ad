"""Fixtures for the real components: the Docker daemon and a busybox base image."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support import dockerenv


@pytest.fixture(scope="session", autouse=True)
def repository_password(tmp_path_factory) -> str:
    """Every repository the tests create is encrypted: a password file for the whole run.

    Set as LAYERFS_PASSWORD_FILE (inherited by the CLI, plugins and mount
    daemons) with weak KDF parameters for speed; tests of unencrypted stores
    remove it with monkeypatch.
    """
    path = tmp_path_factory.mktemp("repo-password") / "password"
    path.write_text("test password of the layerfs suite\n")
    path.chmod(0o600)
    os.environ["LAYERFS_PASSWORD_FILE"] = str(path)
    os.environ["LAYERFS_TESTONLY_WEAKEN_KDF"] = "1"
    # image views left by a test whose mounts were removed forcibly go within seconds
    os.environ["LAYERFS_VIEW_IDLE"] = "2"
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def default_store(tmp_path_factory) -> str:
    """The store of every command and plugin that names none: one of the run's own.

    Set as LAYERFS_STORE, so that the suite never reads or writes the machine's
    embedded default (/var/lib/layerfs): an operator's store, or the one the demo
    made, unencrypted. Tests of what a command does without a store remove it.
    """
    path = tmp_path_factory.mktemp("default-store") / "store"
    os.environ["LAYERFS_STORE"] = str(path)
    return str(path)


@pytest.fixture(scope="session")
def docker_client():
    if os.geteuid() != 0:
        pytest.skip("the Docker tests run as root")
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed: run scripts/setup.sh first")
    return dockerenv.ensure_dockerd()


@pytest.fixture(scope="session")
def busybox_image(docker_client) -> str:
    return dockerenv.ensure_busybox_image(docker_client)


@pytest.fixture(scope="session")
def s3_env():
    """The real Ceph RGW (started once if needed) with AWS_* exported; see tests/support/ceph."""
    from tests.support import ceph

    if shutil.which("radosgw") is None:
        pytest.fail("radosgw is not installed: apt-get install ceph-mon ceph-osd radosgw")
    env = ceph.ensure_rgw()
    env.export()
    return env


@pytest.fixture
def s3_store_url(s3_env, tmp_path, monkeypatch) -> str:
    """A fresh bucket on the real Ceph RGW as an s3:// store URL (removed afterwards).

    The S3 cache goes under the test's temp dir (LAYERFS_CACHE_DIR, inherited by the CLI).
    """
    from tests.support import ceph

    monkeypatch.setenv("LAYERFS_CACHE_DIR", str(tmp_path / "s3-cache"))
    bucket = ceph.new_bucket(s3_env, "store")
    yield f"s3://{bucket}/store"
    ceph.remove_bucket(s3_env, bucket)


@pytest.fixture(scope="module")
def daemon():
    """A private dockerd for one test module (tests/support/private_dockerd.py).

    Plugin tests use it instead of the shared daemon, which remembers every plugin
    name it ever talked to; it can also be restarted, which the shared one must not.
    """
    from tests.support.private_dockerd import private_dockerd

    if os.geteuid() != 0:
        pytest.skip("needs root for dockerd")
    with private_dockerd() as d:
        yield d


@pytest.fixture(scope="module")
def two_hosts():
    """Two "hosts" for one test module: (host-a, host-b), each a dockerd with the busybox
    image in its own mount and network namespaces (tests/support/hosts.py)."""
    from tests.support.hosts import two_hosts as started_hosts

    if os.geteuid() != 0:
        pytest.skip("needs root for dockerd and namespaces")
    if shutil.which("dockerd") is None:
        pytest.fail("dockerd is not installed: run scripts/setup.sh first")
    with started_hosts() as hosts:
        yield hosts

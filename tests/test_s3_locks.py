"""The S3 store's lock: writer leases, the exclusive lease, expiry, on the real RGW."""

from __future__ import annotations

import json
import threading
import time

import pytest

from layerfs.errors import StoreError
from layerfs.store.leases import EXCLUSIVE, WRITER_PREFIX
from layerfs.store.s3 import S3Backend
from tests.support import ceph

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket(s3_env):
    name = ceph.new_bucket(s3_env, "lock")
    yield name
    ceph.remove_bucket(s3_env, name)


def backend(bucket, tmp_path, name, **kwargs) -> S3Backend:
    kwargs.setdefault("lock_poll", 0.2)
    return S3Backend(bucket, "p", cache_root=tmp_path / name, **kwargs)


def lease_keys(s3_env, bucket) -> list[str]:
    resp = s3_env.client().list_objects_v2(Bucket=bucket, Prefix="p/locks/")
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_exclusive_waits_for_a_writer(s3_env, bucket, tmp_path) -> None:
    writer = backend(bucket, tmp_path, "w")
    pruner = backend(bucket, tmp_path, "x", lock_timeout=1.5)
    with writer.lock(False):
        assert any(k.startswith(f"p/{WRITER_PREFIX}") for k in lease_keys(s3_env, bucket))
        with pytest.raises(StoreError, match="writer leases"), pruner.lock(True):
            pytest.fail("the exclusive lock was granted while a writer held its lease")
        # giving up removed the exclusive lease again, so the writer is not blocked
        assert f"p/{EXCLUSIVE}" not in lease_keys(s3_env, bucket)
    with pruner.lock(True):
        assert lease_keys(s3_env, bucket) == [f"p/{EXCLUSIVE}"]
    assert lease_keys(s3_env, bucket) == []


def test_exclusive_is_granted_when_the_writer_ends(bucket, tmp_path) -> None:
    writer = backend(bucket, tmp_path, "w")
    pruner = backend(bucket, tmp_path, "x", lock_timeout=120)
    granted = threading.Event()
    writer_done = threading.Event()

    def prune() -> None:
        with pruner.lock(True):
            assert writer_done.is_set()
            granted.set()

    with writer.lock(False):
        thread = threading.Thread(target=prune)
        thread.start()
        time.sleep(1)
        assert not granted.is_set()
        writer_done.set()
    thread.join(120)
    assert granted.is_set()


def test_writer_waits_while_exclusive_is_held(s3_env, bucket, tmp_path) -> None:
    pruner = backend(bucket, tmp_path, "x")
    writer = backend(bucket, tmp_path, "w", lock_timeout=1.5)
    with pruner.lock(True):
        with pytest.raises(StoreError, match="exclusive lease"), writer.lock(False):
            pytest.fail("a writer got in while the exclusive lease was held")
        assert lease_keys(s3_env, bucket) == [f"p/{EXCLUSIVE}"]
    with writer.lock(False):
        pass


def test_second_exclusive_waits(bucket, tmp_path) -> None:
    first = backend(bucket, tmp_path, "a")
    second = backend(bucket, tmp_path, "b", lock_timeout=1.5)
    with first.lock(True), pytest.raises(StoreError), second.lock(True):
        pytest.fail("two exclusive leases at once")


def test_expired_leases_are_ignored(s3_env, bucket, tmp_path) -> None:
    client = s3_env.client()
    stale = json.dumps({"ttl": 1, "host": "gone", "pid": 1}).encode()
    client.put_object(Bucket=bucket, Key=f"p/{WRITER_PREFIX}dead", Body=stale)
    client.put_object(Bucket=bucket, Key=f"p/{EXCLUSIVE}", Body=stale)
    time.sleep(2.5)  # past the one-second ttl, by the server's clock
    writer = backend(bucket, tmp_path, "w", lock_timeout=10)
    with writer.lock(False):
        pass
    pruner = backend(bucket, tmp_path, "x", lock_timeout=10)
    with pruner.lock(True):  # takes over the expired exclusive lease, ignores the dead writer
        body = json.loads(client.get_object(Bucket=bucket, Key=f"p/{EXCLUSIVE}")["Body"].read())
        assert body["host"] != "gone"


def test_leases_are_refreshed(s3_env, bucket, tmp_path) -> None:
    writer = backend(bucket, tmp_path, "w", lease_ttl=2)
    pruner = backend(bucket, tmp_path, "x", lock_timeout=4)
    with writer.lock(False):
        time.sleep(3)  # longer than the ttl: only refreshes keep the lease alive
        with pytest.raises(StoreError), pruner.lock(True):
            pytest.fail("the exclusive lock ignored a refreshed writer lease")
        writer.flush()  # the lease is healthy

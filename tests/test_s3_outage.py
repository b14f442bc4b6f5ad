"""The S3 store when its gateway goes away and comes back (a private radosgw)."""

from __future__ import annotations

import pytest

from layerfs.errors import StoreError
from layerfs.store.chunks import digest_of
from layerfs.store.s3 import S3Backend
from tests.support import ceph

pytestmark = pytest.mark.s3


@pytest.fixture
def gateway(s3_env, monkeypatch):
    with ceph.PrivateGateway(s3_env) as gw:
        monkeypatch.setenv("AWS_ENDPOINT_URL", gw.env.endpoint)
        bucket = ceph.new_bucket(gw.env, "outage")
        yield gw, bucket
        gw.start()
        ceph.remove_bucket(gw.env, bucket)


def test_flush_fails_cleanly_and_succeeds_after_the_outage(gateway, tmp_path) -> None:
    gw, bucket = gateway
    be = S3Backend(bucket, "p", cache_root=tmp_path / "a", pack_size=50000)
    blobs = [bytes([i]) * 20000 for i in range(20)]
    for data in blobs[:10]:
        be.put_blob(digest_of(data), data)
    be.flush()
    gw.stop()
    for data in blobs[10:]:
        be.put_blob(digest_of(data), data)
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        be.flush()
    assert be.get_blob(digest_of(blobs[15])) == blobs[15]  # still held in memory
    gw.start()
    be.flush()  # the failed packs are uploaded again
    fresh = S3Backend(bucket, "p", cache_root=tmp_path / "b")
    for data in blobs:
        assert fresh.get_blob(digest_of(data)) == data


def test_reads_fail_with_a_clear_error_during_the_outage(gateway, tmp_path) -> None:
    gw, bucket = gateway
    be = S3Backend(bucket, "p", cache_root=tmp_path / "a")
    data = b"x" * 5000
    be.put_blob(digest_of(data), data)
    be.flush()
    reader = S3Backend(bucket, "p", cache_root=tmp_path / "b")
    reader.refresh()
    gw.stop()
    with pytest.raises(StoreError, match="cannot reach"):
        reader.get_blob(digest_of(data))
    gw.start()
    assert reader.get_blob(digest_of(data)) == data

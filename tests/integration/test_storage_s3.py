"""The S3 object storage against a real S3 API (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import secrets
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from common.storage import ObjectNotFound, S3Storage, StorageError, storage_from_url
from common.storage.s3 import DEFAULT_PART_SIZE
from tests.fixtures.seaweedfs import SeaweedFS
from tests.unit.test_storage_local import HOSTILE_KEYS, Rejected, chunks_of, failing_after

MiB = 1 << 20


@pytest.fixture(scope="module")
def bucket_storage(seaweedfs_s3: SeaweedFS) -> S3Storage:
    storage = S3Storage("storage-test", endpoint_url=seaweedfs_s3.endpoint_url)
    storage.ensure_bucket()
    return storage


@pytest.fixture
def storage(bucket_storage: S3Storage) -> S3Storage:
    """A storage under a prefix of its own, so tests never see each other's objects."""
    # Sharing the client saves building one (about half a second) per test.
    prefix = f"run-{secrets.token_hex(4)}"
    return S3Storage(bucket_storage.bucket, prefix, client=bucket_storage.client)


def raw_keys(storage: S3Storage) -> list[str]:
    """Every key in the bucket under the storage's prefix, as S3 itself lists them."""
    response = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=storage.prefix)
    return [item["Key"] for item in response.get("Contents", [])]


def pending_uploads(storage: S3Storage) -> list[str]:
    response = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix)
    return [upload["Key"] for upload in response.get("Uploads", [])]


def test_small_put_stream_round_trip(storage: S3Storage) -> None:
    data = b"".join(chunks_of(3 * MiB + 17, 64 * 1024))

    stored = storage.put_stream(
        "tenants/org_a/files/file-1", chunks_of(3 * MiB + 17, 64 * 1024), content_type="text/plain"
    )

    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert b"".join(storage.open_stream("tenants/org_a/files/file-1")) == data
    assert storage.size("tenants/org_a/files/file-1") == len(data)
    assert storage.exists("tenants/org_a/files/file-1")
    assert raw_keys(storage) == [storage.prefix + "tenants/org_a/files/file-1"]
    head = storage.client.head_object(
        Bucket=storage.bucket, Key=storage.prefix + "tenants/org_a/files/file-1"
    )
    assert head["ContentType"] == "text/plain"


def test_empty_object(storage: S3Storage) -> None:
    stored = storage.put_bytes("empty", b"")

    assert (stored.size, stored.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert storage.get_bytes("empty") == b""
    assert storage.size("empty") == 0


def test_large_streamed_upload_is_multipart_with_bounded_memory(storage: S3Storage) -> None:
    total = 40 * MiB + 123  # five full 8 MiB parts and a short last one
    expected = hashlib.sha256(b"".join(chunks_of(total, MiB))).hexdigest()

    tracemalloc.start()
    try:
        stored = storage.put_stream("models/m1/adapter.safetensors", chunks_of(total, MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (stored.size, stored.sha256) == (total, expected)
    # About two parts (the buffer and the part being sent) plus a few chunks: far below
    # the 40 MiB a buffered upload would hold.
    assert peak < 3 * DEFAULT_PART_SIZE + 4 * MiB
    head = storage.client.head_object(
        Bucket=storage.bucket, Key=storage.prefix + "models/m1/adapter.safetensors"
    )
    assert head["ETag"].endswith('-6"')  # proof it went up in 6 parts
    digest = hashlib.sha256()
    for chunk in storage.open_stream("models/m1/adapter.safetensors"):
        digest.update(chunk)
    assert digest.hexdigest() == expected
    assert storage.size("models/m1/adapter.safetensors") == total


def test_failing_stream_after_some_parts_leaves_nothing(storage: S3Storage) -> None:
    with pytest.raises(Rejected, match="line 12"):
        storage.put_stream("tenants/t/files/f", failing_after(40 * MiB, fail_at=20 * MiB))

    assert not storage.exists("tenants/t/files/f")
    assert raw_keys(storage) == []
    assert pending_uploads(storage) == []


def test_failing_stream_within_the_first_part_leaves_nothing(storage: S3Storage) -> None:
    with pytest.raises(Rejected):
        storage.put_stream("f", failing_after(4 * MiB, fail_at=MiB))

    assert raw_keys(storage) == []
    assert pending_uploads(storage) == []


def test_failing_stream_keeps_the_previous_object(storage: S3Storage) -> None:
    storage.put_bytes("f", b"previous")

    with pytest.raises(Rejected):
        storage.put_stream("f", failing_after(20 * MiB, fail_at=17 * MiB))

    assert storage.get_bytes("f") == b"previous"


def test_put_file_and_download_file(storage: S3Storage, tmp_path: Path) -> None:
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(os.urandom(9 * MiB + 5))

    stored = storage.put_file("m/adapter.safetensors", source)
    dest = tmp_path / "cache" / "adapter.safetensors"
    storage.download_file("m/adapter.safetensors", dest)

    assert stored.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["adapter.safetensors"]


def test_missing_object_raises_object_not_found(storage: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        storage.open_stream("nope")
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("nope")
    with pytest.raises(ObjectNotFound):
        storage.size("nope")
    with pytest.raises(ObjectNotFound):
        storage.download_file("nope", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not storage.exists("nope")


def test_a_folder_is_not_an_object(storage: S3Storage) -> None:
    storage.put_bytes("a/b/c", b"x")

    assert not storage.exists("a/b")
    with pytest.raises(ObjectNotFound):
        storage.open_stream("a/b")
    storage.delete("a/b")
    assert storage.list_keys("") == ["a/b/c"]


def test_delete_is_idempotent(storage: S3Storage) -> None:
    storage.put_bytes("a/b", b"x")

    storage.delete("a/b")
    storage.delete("a/b")

    assert not storage.exists("a/b")
    assert raw_keys(storage) == []


def test_delete_prefix_and_list_keys(storage: S3Storage) -> None:
    for key in ["t/org_1/a", "t/org_1/sub/b", "t/org_10/c", "t/org_2/d", "top"]:
        storage.put_bytes(key, key.encode())

    assert storage.list_keys("t/org_1/") == ["t/org_1/a", "t/org_1/sub/b"]
    assert storage.list_keys("t/org_1") == ["t/org_1/a", "t/org_1/sub/b", "t/org_10/c"]
    assert storage.list_keys("") == ["t/org_1/a", "t/org_1/sub/b", "t/org_10/c", "t/org_2/d", "top"]

    assert storage.delete_prefix("t/org_1/") == 2
    assert storage.list_keys("") == ["t/org_10/c", "t/org_2/d", "top"]
    assert storage.delete_prefix("t/org_1/") == 0
    with pytest.raises(ValueError, match="empty prefix"):
        storage.delete_prefix("")


def test_list_keys_pages_past_one_thousand(storage: S3Storage) -> None:
    keys = [f"many/{i:04d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: storage.put_bytes(key, b""), keys))

    assert storage.list_keys("many/") == keys
    assert storage.delete_prefix("many/") == 1005
    assert raw_keys(storage) == []


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused(storage: S3Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.open_stream(key)
    assert raw_keys(storage) == []


def test_storage_from_url_reaches_the_bucket(
    seaweedfs_s3: SeaweedFS, bucket_storage: S3Storage
) -> None:
    storage = storage_from_url(
        f"s3://{bucket_storage.bucket}/from-url/{secrets.token_hex(4)}",
        s3_endpoint_url=seaweedfs_s3.endpoint_url,
    )
    storage.ping()
    storage.put_bytes("k", b"v")

    assert storage.get_bytes("k") == b"v"
    assert isinstance(storage, S3Storage)
    assert raw_keys(storage) == [storage.prefix + "k"]


def test_ping_and_missing_bucket(seaweedfs_s3: SeaweedFS) -> None:
    storage = S3Storage(f"missing-{secrets.token_hex(4)}", endpoint_url=seaweedfs_s3.endpoint_url)

    with pytest.raises(StorageError):
        storage.ping()
    with pytest.raises(StorageError) as raised:
        storage.open_stream("k")
    assert not isinstance(raised.value, ObjectNotFound)  # a missing bucket is not a 404 key
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.put_stream("k", chunks_of(9 * MiB, MiB))  # never creates the bucket
    with pytest.raises(StorageError):
        storage.ping()

    storage.ensure_bucket()
    storage.ensure_bucket()  # idempotent
    storage.ping()


def test_unreachable_endpoint_is_a_storage_error(seaweedfs_s3: SeaweedFS) -> None:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url="http://127.0.0.1:9",  # the discard port: connection refused
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1),
    )
    storage = S3Storage("b", client=client)

    with pytest.raises(StorageError):
        storage.ping()

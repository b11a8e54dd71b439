"""The local-folder object storage, and the key rules and URL parsing every backend shares."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    StorageError,
    storage_from_url,
)
from common.storage.base import TEMP_PREFIX

MiB = 1 << 20

HOSTILE_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "a/../../outside",
    "a/..",
    "a//b",
    "a/b/",
    "a/./b",
    ".",
    "a\\..\\b",
    "a\x00b",
]


class Rejected(Exception):
    """What a validator raises midway through an upload."""


def chunks_of(total: int, chunk_size: int, seed: int = 0) -> Iterator[bytes]:
    """Deterministic pseudo-random chunks, generated on the fly (never all in memory)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (chunk_size // 32 + 1)
    sent = 0
    n = 0
    while sent < total:
        size = min(chunk_size, total - sent)
        yield (n.to_bytes(8, "little") + block)[:size]
        sent += size
        n += 1


def failing_after(total: int, fail_at: int) -> Iterator[bytes]:
    sent = 0
    for chunk in chunks_of(total, MiB):
        if sent >= fail_at:
            raise Rejected("line 12: bad JSON")
        sent += len(chunk)
        yield chunk


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


def test_put_stream_round_trip_reports_size_and_sha256(storage: LocalStorage) -> None:
    data = b"".join(chunks_of(3 * MiB + 17, 64 * 1024))

    stored = storage.put_stream("tenants/org_a/files/file-1", chunks_of(3 * MiB + 17, 64 * 1024))

    assert stored.key == "tenants/org_a/files/file-1"
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert b"".join(storage.open_stream("tenants/org_a/files/file-1")) == data
    assert storage.get_bytes("tenants/org_a/files/file-1") == data
    assert storage.size("tenants/org_a/files/file-1") == len(data)
    assert storage.exists("tenants/org_a/files/file-1")


def test_open_stream_yields_chunks_of_the_requested_size(storage: LocalStorage) -> None:
    storage.put_bytes("k", b"x" * 2500)

    sizes = [len(c) for c in storage.open_stream("k", chunk_size=1000)]

    assert sizes == [1000, 1000, 500]


def test_empty_object(storage: LocalStorage) -> None:
    stored = storage.put_bytes("empty", b"")

    assert stored.size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()
    assert storage.get_bytes("empty") == b""


def test_put_replaces_an_existing_object(storage: LocalStorage) -> None:
    storage.put_bytes("a/b", b"old")
    storage.put_bytes("a/b", b"new content")

    assert storage.get_bytes("a/b") == b"new content"


def test_put_file_and_download_file(storage: LocalStorage, tmp_path: Path) -> None:
    source = tmp_path / "adapter.safetensors"
    source.write_bytes(os.urandom(2 * MiB + 3))

    stored = storage.put_file("models/m1/adapter.safetensors", source)
    dest = tmp_path / "cache" / "deep" / "adapter.safetensors"
    storage.download_file("models/m1/adapter.safetensors", dest)

    assert stored.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["adapter.safetensors"]


def test_large_streamed_upload_uses_bounded_memory(storage: LocalStorage) -> None:
    total = 40 * MiB
    tracemalloc.start()
    try:
        stored = storage.put_stream("big", chunks_of(total, MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert stored.size == total
    assert stored.sha256 == hashlib.sha256(b"".join(chunks_of(total, MiB))).hexdigest()
    # A few 1 MiB chunks in flight (the generator makes ~4), never the 40 MiB object.
    assert peak < 8 * MiB


def test_failing_stream_leaves_nothing_behind(storage: LocalStorage) -> None:
    with pytest.raises(Rejected, match="line 12"):
        storage.put_stream("tenants/t/files/f", failing_after(10 * MiB, fail_at=5 * MiB))

    assert not storage.exists("tenants/t/files/f")
    assert all_files(storage.root) == []


def test_failing_stream_keeps_the_previous_object(storage: LocalStorage) -> None:
    storage.put_bytes("f", b"previous")

    with pytest.raises(Rejected):
        storage.put_stream("f", failing_after(3 * MiB, fail_at=MiB))

    assert storage.get_bytes("f") == b"previous"
    assert all_files(storage.root) == ["f"]


def test_missing_object_raises_object_not_found(storage: LocalStorage) -> None:
    with pytest.raises(ObjectNotFound):
        storage.open_stream("nope")
    with pytest.raises(ObjectNotFound):
        storage.get_bytes("nope/deeper")
    with pytest.raises(ObjectNotFound):
        storage.size("nope")
    with pytest.raises(ObjectNotFound):
        storage.download_file("nope", storage.root.parent / "dest")
    assert not (storage.root.parent / "dest").exists()
    assert not storage.exists("nope")


def test_a_folder_is_not_an_object(storage: LocalStorage) -> None:
    storage.put_bytes("a/b/c", b"x")

    assert not storage.exists("a/b")
    with pytest.raises(ObjectNotFound):
        storage.open_stream("a/b")
    storage.delete("a/b")  # nothing to delete: no error, and a/b/c survives
    assert storage.exists("a/b/c")
    # S3 could hold both "a/b" and "a/b/c"; a folder cannot, and says so.
    with pytest.raises(StorageError):
        storage.put_bytes("a/b", b"y")
    with pytest.raises(StorageError):
        storage.put_bytes("a/b/c/d", b"y")
    assert all_files(storage.root) == ["a/b/c"]


def test_delete_is_idempotent_and_prunes_empty_folders(storage: LocalStorage) -> None:
    storage.put_bytes("tenants/t/files/f", b"x")

    storage.delete("tenants/t/files/f")
    storage.delete("tenants/t/files/f")

    assert not storage.exists("tenants/t/files/f")
    assert list(storage.root.iterdir()) == []


def test_delete_prefix_and_list_keys(storage: LocalStorage) -> None:
    for key in ["t/org_1/a", "t/org_1/sub/b", "t/org_10/c", "t/org_2/d", "top"]:
        storage.put_bytes(key, key.encode())

    assert storage.list_keys("t/org_1/") == ["t/org_1/a", "t/org_1/sub/b"]
    assert storage.list_keys("t/org_1") == ["t/org_1/a", "t/org_1/sub/b", "t/org_10/c"]
    assert storage.list_keys("") == ["t/org_1/a", "t/org_1/sub/b", "t/org_10/c", "t/org_2/d", "top"]
    assert storage.list_keys("missing/") == []

    assert storage.delete_prefix("t/org_1/") == 2
    assert storage.list_keys("") == ["t/org_10/c", "t/org_2/d", "top"]
    assert storage.delete_prefix("t/org_1/") == 0
    with pytest.raises(ValueError, match="empty prefix"):
        storage.delete_prefix("")


def test_listing_skips_uploads_in_progress(storage: LocalStorage) -> None:
    storage.put_bytes("a/done", b"x")
    (storage.root / "a" / f"{TEMP_PREFIX}upload.part").write_bytes(b"partial")

    assert storage.list_keys("a/") == ["a/done"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_refused(storage: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.open_stream(key)
    with pytest.raises(ValueError):
        storage.delete(key)
    assert not storage.root.parent.joinpath("outside").exists()


@pytest.mark.parametrize("prefix", ["/abs/", "../", "a/../", "a//", "a\\b"])
def test_hostile_prefixes_are_refused(storage: LocalStorage, prefix: str) -> None:
    with pytest.raises(ValueError):
        storage.list_keys(prefix)
    with pytest.raises(ValueError):
        storage.delete_prefix(prefix)


def test_symlink_out_of_the_root_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    storage.root.mkdir(parents=True)
    (storage.root / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ValueError, match="outside"):
        storage.put_bytes("link/secret", b"x")
    assert list(outside.iterdir()) == []


def test_ping_creates_the_root_and_fails_when_unusable(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "new" / "objects").ping()
    assert (tmp_path / "new" / "objects").is_dir()

    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        LocalStorage(tmp_path / "file" / "objects").ping()


def test_storage_from_url_file_relative_absolute_and_base_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    relative = storage_from_url("file://./.loraplex/objects")
    absolute = storage_from_url(f"file://{tmp_path}/abs")
    based = storage_from_url("file://data/objects", base_dir=tmp_path / "base")

    assert isinstance(relative, LocalStorage)
    assert relative.root == tmp_path / ".loraplex" / "objects"
    assert isinstance(absolute, LocalStorage)
    assert absolute.root == tmp_path / "abs"
    assert isinstance(based, LocalStorage)
    assert based.root == tmp_path / "base" / "data" / "objects"


def test_storage_from_url_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)

    with_prefix = storage_from_url(
        "s3://my-bucket/loraplex/prod/", s3_endpoint_url="http://127.0.0.1:1"
    )
    bare = storage_from_url("s3://my-bucket")

    assert isinstance(with_prefix, S3Storage)
    assert (with_prefix.bucket, with_prefix.prefix) == ("my-bucket", "loraplex/prod/")
    assert with_prefix.client.meta.endpoint_url == "http://127.0.0.1:1"
    assert with_prefix.client.meta.region_name == "us-east-1"
    url = with_prefix.client.generate_presigned_url(
        "get_object", Params={"Bucket": "my-bucket", "Key": "loraplex/prod/k"}
    )
    assert url.startswith("http://127.0.0.1:1/my-bucket/loraplex/prod/k?")  # path-style
    assert isinstance(bare, S3Storage)
    assert (bare.bucket, bare.prefix) == ("my-bucket", "")


@pytest.mark.parametrize(
    "url", ["", "file://", "s3://", "s3:///prefix", "s3://b/../x", "gs://b/p", "/plain/path"]
)
def test_storage_from_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        storage_from_url(url)

"""Object storage in an S3 bucket (AWS or any S3-compatible store, e.g. SeaweedFS)."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn, cast

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from common.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ChunkStream,
    ObjectNotFound,
    ObjectStorage,
    StorageError,
    StoredObject,
    validate_key,
    validate_prefix,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 << 20
"""S3 refuses parts below 5 MiB, except the last one."""

DEFAULT_PART_SIZE = 8 << 20
"""Memory held per upload is about two parts; 10,000 parts of 8 MiB allow 78 GiB."""

MAX_PARTS = 10_000

DEFAULT_REGION = "us-east-1"

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Storage(ObjectStorage):
    """Objects in `bucket` under `prefix`: key "a/b" is stored as "<prefix>/a/b".

    Uploads up to one part are a single PutObject; larger ones are a multipart upload of
    `part_size` parts sent one at a time, so memory stays at about two parts whatever the
    object size. Every request carries the SHA-256 of its body, which the store checks.
    The bucket is never created implicitly: see `ensure_bucket()`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        client: S3Client | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3 bucket name is empty")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        prefix = prefix.strip("/")
        validate_prefix(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.part_size = part_size
        self.client: S3Client = client or _make_client(endpoint_url, region_name)

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (for `loraplex up` and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                _raise_storage_error(exc, f"checking bucket {self.bucket!r}")
        except BotoCoreError as exc:
            _raise_storage_error(exc, f"checking bucket {self.bucket!r}")
        region = self.client.meta.region_name
        try:
            if region == DEFAULT_REGION:
                self.client.create_bucket(Bucket=self.bucket)
            else:
                self.client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={
                        "LocationConstraint": cast("BucketLocationConstraintType", region)
                    },
                )
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                _raise_storage_error(exc, f"creating bucket {self.bucket!r}")
        except BotoCoreError as exc:
            _raise_storage_error(exc, f"creating bucket {self.bucket!r}")

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        s3_key = self._s3_key(key)
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload: _MultipartUpload | None = None
        try:
            # Exceptions raised by `chunks` itself propagate unchanged.
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                buffer += chunk
                while len(buffer) >= self.part_size:
                    if upload is None:
                        upload = _MultipartUpload.start(self, s3_key, content_type)
                    with memoryview(buffer) as view:
                        part = bytes(view[: self.part_size])
                    del buffer[: self.part_size]
                    upload.send_part(part)
                    del part
            if upload is None:
                self._put_object(s3_key, bytes(buffer), digest.digest(), content_type)
            else:
                if buffer:
                    upload.send_part(bytes(buffer))
                    buffer.clear()
                upload.complete()
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        s3_key = self._s3_key(key)
        with _s3_errors(f"reading {key!r}", key):
            body = self.client.get_object(Bucket=self.bucket, Key=s3_key)["Body"]

        def read(amount: int) -> bytes:
            with _s3_errors(f"reading {key!r}", key):
                return body.read(amount)

        return ChunkStream(read, body.close, chunk_size)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        s3_key = self._s3_key(key)
        with _s3_errors(f"deleting {key!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=s3_key)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("refusing to delete with an empty prefix")
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with _s3_errors(f"deleting keys under {prefix!r}"):
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={
                        "Objects": [{"Key": self.prefix + k} for k in batch],
                        "Quiet": True,
                    },
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} objects under {prefix!r}, "
                    f"first {first.get('Key')!r}: {first.get('Message')}"
                )
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors(f"listing {prefix!r}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    keys.append(item["Key"][len(self.prefix) :])
        keys.sort()
        return keys

    def size(self, key: str) -> int:
        s3_key = self._s3_key(key)
        with _s3_errors(f"reading {key!r}", key):
            return self.client.head_object(Bucket=self.bucket, Key=s3_key)["ContentLength"]

    def ping(self) -> None:
        with _s3_errors(f"reaching bucket {self.bucket!r}"):
            self.client.head_bucket(Bucket=self.bucket)

    def _s3_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _put_object(self, s3_key: str, data: bytes, sha256: bytes, content_type: str) -> None:
        with _s3_errors(f"uploading {s3_key!r}"):
            self.client.put_object(
                Bucket=self.bucket,
                Key=s3_key,
                Body=data,
                ContentType=content_type,
                ChecksumSHA256=_b64(sha256),
            )


class _MultipartUpload:
    """One multipart upload in progress: parts are sent in order, then completed or aborted."""

    def __init__(self, storage: S3Storage, s3_key: str, upload_id: str) -> None:
        self._storage = storage
        self._s3_key = s3_key
        self._upload_id = upload_id
        self._parts: list[CompletedPartTypeDef] = []

    @classmethod
    def start(cls, storage: S3Storage, s3_key: str, content_type: str) -> _MultipartUpload:
        with _s3_errors(f"starting upload of {s3_key!r}"):
            response = storage.client.create_multipart_upload(
                Bucket=storage.bucket,
                Key=s3_key,
                ContentType=content_type,
                ChecksumAlgorithm="SHA256",
            )
        return cls(storage, s3_key, response["UploadId"])

    def send_part(self, data: bytes) -> None:
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StorageError(
                f"{self._s3_key!r} needs more than {MAX_PARTS} parts of "
                f"{self._storage.part_size} bytes; raise part_size"
            )
        checksum = _b64(hashlib.sha256(data).digest())
        with _s3_errors(f"uploading part {number} of {self._s3_key!r}"):
            response = self._storage.client.upload_part(
                Bucket=self._storage.bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        self._parts.append(
            {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}
        )

    def complete(self) -> None:
        with _s3_errors(f"completing upload of {self._s3_key!r}"):
            self._storage.client.complete_multipart_upload(
                Bucket=self._storage.bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )

    def abort(self) -> None:
        try:
            self._storage.client.abort_multipart_upload(
                Bucket=self._storage.bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
            )
        except (BotoCoreError, ClientError):
            # The original error matters more; the parts stay invisible under the key,
            # and a bucket lifecycle rule for incomplete uploads reclaims their space.
            log.warning(
                "could not abort multipart upload %s of %r",
                self._upload_id,
                self._s3_key,
                exc_info=True,
            )


def _make_client(endpoint_url: str | None, region_name: str | None) -> S3Client:
    # A session per storage: boto3's default session is not thread-safe to create clients.
    session = boto3.session.Session()
    region = region_name or session.region_name or DEFAULT_REGION
    config = Config(
        # S3-compatible stores rarely resolve virtual-host bucket names.
        s3={"addressing_style": "path"} if endpoint_url else None,
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=10,
        read_timeout=60,
    )
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


@contextmanager
def _s3_errors(action: str, key: str | None = None) -> Iterator[None]:
    """Turn boto errors into StorageError; with a key, "not found" into ObjectNotFound."""
    try:
        yield
    except ClientError as exc:
        if key is not None and _error_code(exc) in _NOT_FOUND_CODES:
            raise ObjectNotFound(key) from None
        _raise_storage_error(exc, action)
    except (BotoCoreError, urllib3.exceptions.HTTPError) as exc:
        _raise_storage_error(exc, action)


def _raise_storage_error(exc: Exception, action: str) -> NoReturn:
    raise StorageError(f"S3 error {action}: {exc}") from exc


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")

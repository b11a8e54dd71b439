"""Object storage: one interface over a local folder and S3 (see `ObjectStorage`)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from common.storage.base import (
    ObjectNotFound,
    ObjectStorage,
    StorageError,
    StoredObject,
    validate_key,
    validate_prefix,
)
from common.storage.local import LocalStorage
from common.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "ObjectNotFound",
    "ObjectStorage",
    "S3Storage",
    "StorageError",
    "StoredObject",
    "storage_from_url",
    "validate_key",
    "validate_prefix",
]


def storage_from_url(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> ObjectStorage:
    """Build the storage a `STORAGE_URL` names.

    - "file://DIR": a local folder; a relative DIR ("file://./.loraplex/objects") is
      resolved against `base_dir`, or the working directory; "file:///abs" is absolute.
    - "s3://bucket/prefix": an S3 bucket, keys under the optional prefix; credentials
      and region come from the usual AWS environment and config files (region defaults
      to us-east-1); `s3_endpoint_url` points it at an S3-compatible store.
    """
    if url.startswith("file://"):
        folder = url.removeprefix("file://")
        if not folder:
            raise ValueError(f"storage URL names no folder: {url!r}")
        path = Path(folder)
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else Path.cwd()) / path
        return LocalStorage(path)
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise ValueError(f"storage URL must not have a query or fragment: {url!r}")
        if not parts.netloc:
            raise ValueError(f"storage URL names no bucket: {url!r}")
        return S3Storage(parts.netloc, parts.path, endpoint_url=s3_endpoint_url or None)
    raise ValueError(f"unsupported storage URL {url!r}: use file://DIR or s3://bucket/prefix")

"""The object storage contract shared by every backend, and the key rules."""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DEFAULT_CHUNK_SIZE = 1 << 20
"""Bytes per chunk when reading files or streaming objects back."""

TEMP_PREFIX = ".loraplex-tmp-"
"""Name prefix of in-progress local files; listings skip them."""


class StorageError(Exception):
    """The store failed or could not be reached."""


class ObjectNotFound(StorageError):
    """No object is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key!r}")
        self.key = key


@dataclass(frozen=True)
class StoredObject:
    """What a completed upload wrote: the key, its size in bytes and its hex sha256."""

    key: str
    size: int
    sha256: str


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative posix path, else raise ValueError.

    Keys are built by our code, but one that came out wrong must never reach outside the
    store's root folder or prefix, whatever the backend.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    _check_segments(key.split("/"), key)
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is "" or a safe key prefix, else raise ValueError.

    A prefix matches keys by plain string comparison, as S3 does: "a/b" matches "a/b/c"
    and "a/bc"; end it with "/" to mean one folder.
    """
    if not isinstance(prefix, str):
        raise ValueError("key prefix must be a string")
    if prefix:
        segments = prefix.split("/")
        if segments[-1] == "":
            segments.pop()
        _check_segments(segments, prefix)
    return prefix


def _check_segments(segments: list[str], original: str) -> None:
    if original.startswith("/"):
        raise ValueError(f"object key must be relative: {original!r}")
    if "\\" in original or "\x00" in original:
        raise ValueError(f"object key contains a backslash or NUL: {original!r}")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"object key has an empty, '.' or '..' segment: {original!r}")


def iter_file(path: str | os.PathLike[str], chunk_size: int) -> Iterator[bytes]:
    """Yield a local file's content in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def iter_slices(data: bytes, chunk_size: int) -> Iterator[bytes]:
    """Yield `data` in slices, so a large payload is uploaded in parts like a stream."""
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]


class ChunkStream(Iterator[bytes]):
    """An object's bytes in chunks; releases the file or connection at the end or on close().

    A plain generator would only release it when iterated to the end, and leak it when a
    caller drops the stream before the first chunk (an aborted download, a failed check).
    """

    def __init__(
        self, read: Callable[[int], bytes], close: Callable[[], None], chunk_size: int
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._read = read
        self._close: Callable[[], None] | None = close
        self._chunk_size = chunk_size

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> bytes:
        if self._close is None:
            raise StopIteration
        try:
            chunk = self._read(self._chunk_size)
        except BaseException:
            self.close()
            raise
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        """Release the underlying file or connection; safe to call twice."""
        close, self._close = self._close, None
        if close is not None:
            close()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class ObjectStorage(ABC):
    """A flat key -> bytes store: a local folder in development, an S3 bucket in production.

    Keys are relative posix paths ("tenants/org_x/files/file-abc"). A write is atomic:
    readers see the whole new object or nothing, never a part of it.
    """

    @abstractmethod
    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        """Store the concatenated chunks under `key`, in constant memory.

        Size and sha256 are computed on the way. If iterating `chunks` raises (for example
        a validator rejecting an upload midway), the partial upload is discarded and the
        exception propagates unchanged: nothing is ever visible under `key`.
        """

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Store `data` under `key`."""
        return self.put_stream(key, iter_slices(data, DEFAULT_CHUNK_SIZE))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> StoredObject:
        """Upload a local file under `key`, streaming it."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"not a file: {os.fspath(path)!r}")
        return self.put_stream(key, iter_file(path, DEFAULT_CHUNK_SIZE))

    @abstractmethod
    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """Return an iterator over the object's bytes; raise ObjectNotFound right away.

        The iterator releases its file or connection when exhausted or closed.
        """

    def get_bytes(self, key: str) -> bytes:
        """Return the whole object; meant for small objects (manifests, configs)."""
        return b"".join(self.open_stream(key))

    def download_file(self, key: str, dest_path: str | os.PathLike[str]) -> None:
        """Write the object to `dest_path` atomically (temp file, then rename)."""
        stream = self.open_stream(key)
        try:
            write_file_atomically(Path(dest_path), stream)
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; return how many.

        An empty prefix is refused: wiping a whole store is never what a caller means.
        """

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Return the sorted keys that start with `prefix` ("" lists everything)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Return the object's size in bytes; raise ObjectNotFound."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StorageError if the store cannot be used (for readiness checks)."""


def write_file_atomically(dest: Path, chunks: Iterable[bytes]) -> tuple[int, str]:
    """Write chunks to a temp file next to `dest`, fsync it, then rename it over `dest`.

    Returns (size, hex sha256). Exceptions raised by `chunks` propagate unchanged;
    filesystem failures become StorageError. Either way the temp file is removed and
    `dest` is left as it was.
    """
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = _make_temp_file(dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                _write(f, chunk, dest)
            _sync(f, dest)
        _replace(tmp_name, dest)
    except BaseException:
        _remove_quietly(tmp_name)
        raise
    fsync_dir(dest.parent)
    return size, digest.hexdigest()


def _make_temp_file(folder: Path) -> tuple[int, str]:
    # A concurrent delete may prune the (empty) folder between mkdir and mkstemp: retry.
    for attempt in range(5):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=".part")
        except FileNotFoundError:
            if attempt == 4:
                raise StorageError(f"cannot create folder {folder}") from None
        except OSError as exc:
            raise StorageError(f"cannot write in {folder}: {exc}") from exc
    raise AssertionError("unreachable")


def _write(f: BinaryIO, chunk: bytes, dest: Path) -> None:
    try:
        f.write(chunk)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc}") from exc


def _sync(f: BinaryIO, dest: Path) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc}") from exc


def _replace(tmp_name: str, dest: Path) -> None:
    try:
        Path(tmp_name).replace(dest)
    except OSError as exc:
        raise StorageError(f"cannot move the new file to {dest}: {exc}") from exc


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    Path(path).unlink(missing_ok=True)

"""Object storage in a local folder: the development and single-machine backend."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.storage.base import (
    DEFAULT_CHUNK_SIZE,
    TEMP_PREFIX,
    ChunkStream,
    ObjectNotFound,
    ObjectStorage,
    StorageError,
    StoredObject,
    validate_key,
    validate_prefix,
    write_file_atomically,
)


class LocalStorage(ObjectStorage):
    """Objects as files under `root`, key "a/b/c" at `root`/a/b/c.

    Writes go to a temp file in the target folder, are fsynced and renamed into place,
    so a reader sees the old object, the new one, or none. Folders are created on write
    and pruned when they become empty. A key cannot be both an object and a folder
    ("a/b" and "a/b/c"), which S3 allows; our key layouts never need it.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        path = self._path(key)
        size, sha256 = write_file_atomically(path, chunks)
        return StoredObject(key=key, size=size, sha256=sha256)

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - ChunkStream closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc
        return ChunkStream(f.read, f.close, chunk_size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r}: {exc}") from exc
        self._prune_empty_folders(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("refusing to delete with an empty prefix")
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix names; filter the rest by string.
        folder_part, _, name_part = prefix.rpartition("/")
        start = self.root.joinpath(*folder_part.split("/")) if folder_part else self.root
        self._check_inside_root(start, prefix)
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            if dirpath == str(start):
                dirnames[:] = [d for d in dirnames if d.startswith(name_part)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort()
        return keys

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            if path.is_file():
                return path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot stat {key!r}: {exc}") from exc
        raise ObjectNotFound(key)

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} unusable: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage folder {self.root} is not writable")

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.rpartition("/")[2].startswith(TEMP_PREFIX):
            raise ValueError(f"object key uses the reserved name prefix: {key!r}")
        path = self.root.joinpath(*key.split("/"))
        self._check_inside_root(path, key)
        return path

    def _check_inside_root(self, path: Path, key: str) -> None:
        # validate_key already rules out "..": this catches a symlink leading outside.
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"object key leads outside the storage folder: {key!r}")

    def _prune_empty_folders(self, folder: Path) -> None:
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

"""Folders with a manifest in object storage: a download trusts nothing it did not check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from common.storage import LocalStorage, StorageError
from workers.jobs.artifacts import (
    MANIFEST,
    ArtifactCorrupt,
    ArtifactMissing,
    download_folder,
    upload_folder,
)

PREFIX = "tenants/t/jobs/j/checkpoints/step-2-a1"


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture
def digest(storage: LocalStorage, tmp_path: Path) -> str:
    """A folder of two files uploaded under PREFIX; the manifest's recorded sha256."""
    folder = tmp_path / "checkpoint"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (folder / "sub" / "state.json").write_text('{"step": 2}')
    _manifest, sha = upload_folder(storage, folder, PREFIX, {"step": 2})
    return sha


def test_an_intact_folder_comes_back_whole(
    storage: LocalStorage, digest: str, tmp_path: Path
) -> None:
    manifest = download_folder(storage, PREFIX, tmp_path / "out", expected_sha256=digest)
    assert manifest["step"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == b"weights" * 100
    assert (tmp_path / "out" / "sub" / "state.json").read_text() == '{"step": 2}'


def test_a_manifest_changed_since_it_was_recorded_is_refused(
    storage: LocalStorage, digest: str, tmp_path: Path
) -> None:
    # Every file still matches the manifest: only the recorded digest can tell.
    manifest = json.loads(storage.get_bytes(f"{PREFIX}/{MANIFEST}"))
    manifest["step"] = 4
    storage.put_bytes(f"{PREFIX}/{MANIFEST}", json.dumps(manifest).encode())

    download_folder(storage, PREFIX, tmp_path / "unchecked")  # no digest: not checked
    with pytest.raises(ArtifactCorrupt, match="manifest"):
        download_folder(storage, PREFIX, tmp_path / "out", expected_sha256=digest)


def test_a_changed_file_is_refused(storage: LocalStorage, digest: str, tmp_path: Path) -> None:
    storage.put_bytes(f"{PREFIX}/adapter_model.safetensors", b"garbage")
    with pytest.raises(ArtifactCorrupt) as caught:
        download_folder(storage, PREFIX, tmp_path / "out", expected_sha256=digest)
    assert not isinstance(caught.value, ArtifactMissing)


@pytest.mark.parametrize("gone", [MANIFEST, "sub/state.json"])
def test_a_missing_object_is_reported_as_missing(
    storage: LocalStorage, digest: str, tmp_path: Path, gone: str
) -> None:
    storage.delete(f"{PREFIX}/{gone}")
    with pytest.raises(ArtifactMissing):
        download_folder(storage, PREFIX, tmp_path / "out", expected_sha256=digest)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"files": {"a": "no sha"}}',
        b'{"files": {"../../outside": {"sha256": "00"}}}',
        b'{"files": {"/etc/passwd": {"sha256": "00"}}}',
    ],
)
def test_a_malformed_or_unsafe_manifest_is_refused(
    storage: LocalStorage, tmp_path: Path, body: bytes
) -> None:
    storage.put_bytes(f"{PREFIX}/{MANIFEST}", body)
    with pytest.raises(ArtifactCorrupt):
        download_folder(
            storage, PREFIX, tmp_path / "out", expected_sha256=hashlib.sha256(body).hexdigest()
        )
    assert not (tmp_path / "outside").exists()


def test_a_store_that_cannot_be_read_is_not_corruption(
    storage: LocalStorage, digest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retrying may work: the caller must not give up on the folder."""

    def unreachable(key: str, chunk_size: int = 0) -> bytes:
        raise StorageError("connection refused")

    monkeypatch.setattr(storage, "open_stream", unreachable)
    with pytest.raises(StorageError) as caught:
        download_folder(storage, PREFIX, tmp_path / "out", expected_sha256=digest)
    assert not isinstance(caught.value, ArtifactCorrupt)

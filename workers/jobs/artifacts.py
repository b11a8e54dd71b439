"""Folders in object storage with a manifest: checkpoints and published adapters.

Every file is uploaded first, then ``manifest.json`` (sha256 and size of each file plus
metadata). A folder without a manifest is incomplete and is never used; the database row that
points at a folder is written only after its manifest, so recording is the commit point. The
row keeps the manifest's sha256, so a download checks the manifest too, not only the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.storage import ObjectNotFound, ObjectStorage

MANIFEST = "manifest.json"


class ArtifactCorrupt(Exception):
    """The folder cannot be trusted: a file or the manifest differs from what was recorded."""


class ArtifactMissing(ArtifactCorrupt):
    """The manifest or a file it lists is not in the store."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def upload_folder(
    storage: ObjectStorage, local: Path, prefix: str, metadata: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """Upload every file under ``local`` then the manifest; returns (manifest, its sha256)."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        relative = path.relative_to(local).as_posix()
        stored = storage.put_file(f"{prefix}/{relative}", path)
        expected = _sha256(path)
        if stored.sha256 != expected:
            raise ArtifactCorrupt(f"{relative}: uploaded sha256 differs from the local file")
        files[relative] = {"sha256": stored.sha256, "bytes": stored.size}
    manifest = {**metadata, "files": files}
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.put_bytes(f"{prefix}/{MANIFEST}", body)
    return manifest, hashlib.sha256(body).hexdigest()


def download_folder(
    storage: ObjectStorage, prefix: str, local: Path, *, expected_sha256: str | None = None
) -> dict[str, Any]:
    """Download a folder and verify every file against its manifest, and the manifest against
    ``expected_sha256`` (the digest recorded with the folder) when one is given.

    Raises ArtifactCorrupt (ArtifactMissing for an object not in the store); any other storage
    error (the store unreachable) propagates unchanged, since trying again may well work.
    """
    try:
        body = storage.get_bytes(f"{prefix}/{MANIFEST}")
    except ObjectNotFound:
        raise ArtifactMissing(f"{prefix}: no manifest") from None
    if expected_sha256 is not None and hashlib.sha256(body).hexdigest() != expected_sha256:
        raise ArtifactCorrupt(f"{prefix}: the manifest's sha256 differs from the recorded one")
    files = _manifest_files(body, prefix)
    local.mkdir(parents=True, exist_ok=True)
    for relative, digest in files.items():
        dest = local / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage.download_file(f"{prefix}/{relative}", dest)
        except ObjectNotFound:
            raise ArtifactMissing(
                f"{prefix}/{relative}: listed in the manifest, not stored"
            ) from None
        if _sha256(dest) != digest:
            raise ArtifactCorrupt(f"{prefix}/{relative}: sha256 does not match the manifest")
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def _manifest_files(body: bytes, prefix: str) -> dict[str, str]:
    """The manifest's files as {relative path: sha256}; ArtifactCorrupt when malformed.

    A path must stay inside the folder: a manifest is data read back from the store.
    """
    try:
        manifest = json.loads(body)
        files = manifest["files"]
        result = {str(name): str(info["sha256"]) for name, info in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ArtifactCorrupt(f"{prefix}: the manifest is malformed") from None
    for name in result:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            raise ArtifactCorrupt(f"{prefix}: the manifest lists an unsafe path {name!r}")
    return result

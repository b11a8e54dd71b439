"""Folders in object storage with a manifest: checkpoints and published adapters.

Every file is uploaded first, then ``manifest.json`` (sha256 and size of each file plus
metadata). A folder without a manifest is incomplete and is never used; the database row that
points at a folder is written only after its manifest, so recording is the commit point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.storage import ObjectStorage

MANIFEST = "manifest.json"


class ArtifactCorrupt(Exception):
    pass


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


def download_folder(storage: ObjectStorage, prefix: str, local: Path) -> dict[str, Any]:
    """Download a folder and verify every file against its manifest."""
    manifest: dict[str, Any] = json.loads(storage.get_bytes(f"{prefix}/{MANIFEST}"))
    local.mkdir(parents=True, exist_ok=True)
    for relative, info in manifest["files"].items():
        dest = local / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(f"{prefix}/{relative}", dest)
        if _sha256(dest) != info["sha256"]:
            raise ArtifactCorrupt(f"{prefix}/{relative}: sha256 does not match the manifest")
    return manifest

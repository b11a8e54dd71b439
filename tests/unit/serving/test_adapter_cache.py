"""Adapter download and verification against the manifest (local object storage)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from common.storage import LocalStorage
from serving.adapters import AdapterCache, AdapterIntegrityError, AdapterRef, fetch_verified


def _publish(storage: LocalStorage, prefix: str, files: dict[str, bytes]) -> str:
    manifest = {
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in files.items()
        }
    }
    for name, data in files.items():
        storage.put_bytes(f"{prefix}/{name}", data)
    body = json.dumps(manifest).encode()
    storage.put_bytes(f"{prefix}/manifest.json", body)
    return hashlib.sha256(body).hexdigest()


GOOD = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00weights"}


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


def test_verified_download(storage: LocalStorage, tmp_path: Path) -> None:
    digest = _publish(storage, "t/models/a", GOOD)
    ref = AdapterRef("ft:a", "tiny", "t/models/a", digest)
    dest = tmp_path / "cache" / "a"
    dest.parent.mkdir()
    assert fetch_verified(storage, ref, dest) == sum(len(v) for v in GOOD.values())
    assert (dest / "adapter_model.safetensors").read_bytes() == GOOD["adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("weights", "does not match the sha256"),
        ("manifest", "manifest.json differs"),
        ("pickle", "only safetensors"),
        ("traversal", "unsafe path"),
    ],
)
def test_tampered_adapters_are_refused_and_leave_nothing(
    storage: LocalStorage, tmp_path: Path, tamper: str, message: str
) -> None:
    files = dict(GOOD)
    if tamper == "pickle":
        files["adapter_model.bin"] = b"pickle"
    if tamper == "traversal":
        files["../escape.json"] = b"{}"
    digest = _publish(storage, "t/models/b", files) if tamper != "traversal" else ""
    if tamper == "traversal":
        # A manifest naming a path outside the folder (written by hand: keys can't hold "..").
        body = json.dumps(
            {
                "files": {
                    "../escape.json": {"sha256": "0" * 64},
                    **{n: {"sha256": hashlib.sha256(d).hexdigest()} for n, d in GOOD.items()},
                }
            }
        ).encode()
        for name, data in GOOD.items():
            storage.put_bytes(f"t/models/b/{name}", data)
        storage.put_bytes("t/models/b/manifest.json", body)
        digest = hashlib.sha256(body).hexdigest()
    if tamper == "weights":
        storage.put_bytes("t/models/b/adapter_model.safetensors", b"\x00weightz")
    if tamper == "manifest":
        digest = "f" * 64
    ref = AdapterRef("ft:b", "tiny", "t/models/b", digest)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with pytest.raises(AdapterIntegrityError, match=message):
        fetch_verified(storage, ref, cache_dir / "b")
    assert list(cache_dir.iterdir()) == []


def test_single_flight_and_lru_eviction(storage: LocalStorage, tmp_path: Path) -> None:
    refs = []
    for i in range(3):
        digest = _publish(storage, f"t/models/{i}", GOOD)
        refs.append(AdapterRef(f"ft:{i}", "tiny", f"t/models/{i}", digest))
    size = sum(len(v) for v in GOOD.values())
    cache = AdapterCache(storage, tmp_path / "cache", max_bytes=2 * size)

    async def run() -> None:
        paths = await asyncio.gather(*(cache.ensure(refs[0], set) for _ in range(50)))
        assert len(set(paths)) == 1 and cache.downloads == 1
        await cache.ensure(refs[1], set)
        # A third adapter evicts the least recently used one that is not pinned.
        await cache.ensure(refs[2], pinned=lambda: {"ft:0"})
        assert cache.path_for("ft:0").exists()
        assert not cache.path_for("ft:1").exists()
        assert cache.downloads == 3

    asyncio.run(run())


def test_a_restarted_gateway_counts_the_folders_it_finds(
    storage: LocalStorage, tmp_path: Path
) -> None:
    refs = []
    for i in range(3):
        digest = _publish(storage, f"t/models/{i}", GOOD)
        refs.append(AdapterRef(f"ft:{i}", "tiny", f"t/models/{i}", digest))
    size = sum(len(v) for v in GOOD.values())
    root = tmp_path / "cache"

    async def fill() -> None:
        first = AdapterCache(storage, root, max_bytes=2 * size)
        await first.ensure(refs[0], set)
        await first.ensure(refs[1], set)

    asyncio.run(fill())
    (root / ".fetch-x").mkdir()  # an interrupted download
    (root / "unknown").mkdir()  # nothing says what this is
    restarted = AdapterCache(storage, root, max_bytes=2 * size)
    assert not (root / ".fetch-x").exists() and not (root / "unknown").exists()

    async def third() -> None:
        await restarted.ensure(refs[2], set)

    asyncio.run(third())
    # The bound held across the restart: the oldest folder made room, without a download.
    assert not restarted.path_for("ft:0").exists()
    assert restarted.path_for("ft:1").exists() and restarted.path_for("ft:2").exists()
    assert restarted.downloads == 1

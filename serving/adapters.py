"""Getting a tenant's adapter onto a replica: local disk cache, verification, load, eviction.

First use of an adapter: its folder is downloaded from object storage into a bounded local
cache and every file is checked against the manifest written by the worker (and the manifest
against the sha256 recorded in the database), so a corrupted or tampered object is refused
before vLLM ever reads it. Then the replica is told to register it under the model's public id
(vLLM names are immutable and ids are never reused, so a name always means the same weights).

Concurrency: one download per adapter (single flight), one load per adapter and replica (the
replica's admin lock, rechecked inside), and at most ``capacity`` adapters registered on a
replica, the least recently used unloaded first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from anyio import to_thread
from prometheus_client import Counter as MetricCounter

from common.storage import ObjectStorage
from serving.replicas import Replica, ReplicaPool

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
# Pickle-based weight formats are never fetched, let alone loaded.
_REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_VERIFIED_MARK = ".verified"

INTEGRITY_FAILURES = MetricCounter(
    "loraplex_adapter_integrity_failures_total",
    "Adapters refused because a file did not match its manifest.",
)
ADAPTER_LOADS = MetricCounter(
    "loraplex_adapter_loads_total", "Adapters registered on a vLLM replica.", ["replica"]
)
ADAPTER_UNLOADS = MetricCounter(
    "loraplex_adapter_unloads_total", "Adapters unloaded from a vLLM replica.", ["replica"]
)


@dataclass(frozen=True)
class AdapterRef:
    """What the gateway needs to place one fine-tuned model."""

    name: str  # the public model id, also the vLLM adapter name
    base_model: str
    storage_prefix: str
    manifest_sha256: str


class AdapterIntegrityError(Exception):
    """An adapter's stored files do not match what the worker published."""


class AdapterLoadError(Exception):
    """A replica refused or failed to register an adapter."""


class AdapterRefused(AdapterLoadError):
    """The replica answered, and refused this adapter (its rank above the replica's maximum,
    say): the adapter's problem, not the replica's health."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
        raise AdapterIntegrityError(f"manifest lists an unsafe path {name!r}")
    if path.suffix.lower() in _REFUSED_SUFFIXES:
        raise AdapterIntegrityError(f"manifest lists {name!r}: only safetensors weights are loaded")
    return path


def fetch_verified(storage: ObjectStorage, ref: AdapterRef, dest: Path) -> int:
    """Download ``ref`` into ``dest`` (which must not exist) and verify it; returns its bytes.

    Blocking: run it in a thread. Nothing is left at ``dest`` unless every check passed.
    """
    body = storage.get_bytes(f"{ref.storage_prefix}/{MANIFEST}")
    if hashlib.sha256(body).hexdigest() != ref.manifest_sha256:
        raise AdapterIntegrityError(f"{ref.name}: manifest.json differs from the one published")
    manifest: dict[str, Any] = json.loads(body)
    files: dict[str, dict[str, Any]] = manifest.get("files", {})
    if WEIGHTS not in files or "adapter_config.json" not in files:
        raise AdapterIntegrityError(f"{ref.name}: manifest has no {WEIGHTS} or adapter_config.json")
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    # mkdtemp makes it 0700; the vLLM replica reading it may run as another user.
    staging.chmod(0o755)
    try:
        total = 0
        for name, info in sorted(files.items()):
            relative = _safe_relative(name)
            target = staging.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(f"{ref.storage_prefix}/{name}", target)
            if _sha256_file(target) != info.get("sha256"):
                raise AdapterIntegrityError(
                    f"{ref.name}: {name} does not match the sha256 in its manifest"
                )
            total += target.stat().st_size
        # The manifest it matched, and the adapter's name (for a later process to adopt it).
        (staging / _VERIFIED_MARK).write_text(f"{ref.manifest_sha256}\n{ref.name}")
        staging.rename(dest)
        return total
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _folder_bytes(folder: Path) -> int:
    """The adapter's files in ``folder``, as ``fetch_verified`` counts them (not the marker)."""
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != _VERIFIED_MARK
    )


def _marked_name(marker: Path) -> str | None:
    """The adapter name a verified folder's marker records (None: not verified, or written by
    a version that did not record it)."""
    try:
        lines = marker.read_text().split("\n")
    except OSError:
        return None
    return lines[1] if len(lines) == 2 and lines[1] else None


class AdapterCache:
    """Verified adapter folders on local disk, bounded in bytes, least recently used evicted."""

    def __init__(self, storage: ObjectStorage, root: Path, max_bytes: int) -> None:
        self._storage = storage
        self._root = root
        self._max_bytes = max_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self.downloads = 0
        root.mkdir(parents=True, exist_ok=True)
        self._adopt_folders()

    def _adopt_folders(self) -> None:
        """Count the folders an earlier process left (oldest first), so the byte bound holds
        across restarts; drop unfinished downloads and folders that cannot be accounted for."""
        found: list[tuple[float, str, int]] = []
        for folder in (entry for entry in self._root.iterdir() if entry.is_dir()):
            marker = folder / _VERIFIED_MARK
            name = _marked_name(marker)
            if folder.name.startswith(".fetch-") or name is None or self.path_for(name) != folder:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            size = _folder_bytes(folder)
            found.append((marker.stat().st_mtime, name, size))
        for _, name, size in sorted(found):
            self._sizes[name] = size

    def path_for(self, name: str) -> Path:
        return self._root / hashlib.sha256(name.encode()).hexdigest()[:32]

    async def ensure(self, ref: AdapterRef, pinned: Callable[[], set[str]]) -> Path:
        """A local, verified copy of ``ref``. ``pinned()`` names the folders that must not be
        evicted; it is asked when room is made (after the download, which may take long), not
        before."""
        path = self.path_for(ref.name)
        marker = path / _VERIFIED_MARK
        if ref.name in self._sizes and marker.exists():
            self._sizes.move_to_end(ref.name)
            return path
        if (running := self._inflight.get(ref.name)) is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._inflight[ref.name] = future
        try:
            size = await to_thread.run_sync(self._fetch_or_adopt, ref, path)
            self._sizes[ref.name] = size
            self._sizes.move_to_end(ref.name)
            self._evict(keep=pinned() | {ref.name})
            future.set_result(path)
            return path
        except BaseException as exc:
            future.set_exception(exc)
            # Mark the exception retrieved for waiters that never came.
            future.exception()
            raise
        finally:
            del self._inflight[ref.name]

    def _fetch_or_adopt(self, ref: AdapterRef, path: Path) -> int:
        marker = path / _VERIFIED_MARK
        if marker.exists() and marker.read_text().split("\n")[0] == ref.manifest_sha256:
            # Left by an earlier gateway process; it was verified when it was written.
            return _folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        try:
            size = fetch_verified(self._storage, ref, path)
        except AdapterIntegrityError:
            INTEGRITY_FAILURES.inc()
            log.error("adapter %s refused: integrity check failed", ref.name, exc_info=True)
            raise
        self.downloads += 1
        return size

    def _evict(self, keep: set[str]) -> None:
        total = sum(self._sizes.values())
        for name in list(self._sizes):
            if total <= self._max_bytes:
                break
            if name in keep:
                continue
            total -= self._sizes.pop(name)
            shutil.rmtree(self.path_for(name), ignore_errors=True)

    def forget(self, name: str) -> None:
        self._sizes.pop(name, None)
        shutil.rmtree(self.path_for(name), ignore_errors=True)


class AdapterPlacer:
    """Registers adapters on replicas within each replica's capacity."""

    def __init__(
        self,
        pool: ReplicaPool,
        cache: AdapterCache,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        capacity: int,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._client = client
        self._headers = headers
        self._capacity = max(1, capacity)
        # Requests in flight per (replica url, adapter): such an adapter is not evicted.
        self.busy: Counter[tuple[str, str]] = Counter()
        # Adapters between their fetch and their registration: their folders must stay.
        self._placing: Counter[str] = Counter()
        self.loads = 0

    def _in_use(self) -> set[str]:
        """Adapters whose local folders must stay: registered somewhere, being placed, or
        serving a request (a replica may have lost one behind our back and read it again)."""
        names = {name for r in self._pool.replicas for name in r.adapters}
        names.update(self._placing)
        names.update(name for (_, name), count in self.busy.items() if count > 0)
        return names

    async def ensure_loaded(self, replica: Replica, ref: AdapterRef) -> None:
        if ref.name in replica.adapters:
            replica.touch(ref.name)
            return
        self._placing[ref.name] += 1
        try:
            path = await self._cache.ensure(ref, pinned=self._in_use)
            await self._register(replica, ref, path)
        finally:
            self._placing[ref.name] -= 1
            if self._placing[ref.name] <= 0:
                del self._placing[ref.name]

    async def _register(self, replica: Replica, ref: AdapterRef, path: Path) -> None:
        async with replica.admin_lock:
            if ref.name in replica.adapters:
                replica.touch(ref.name)
                return
            await self._make_room(replica)
            response = await self._client.post(
                f"{replica.url}/v1/load_lora_adapter",
                json={"lora_name": ref.name, "lora_path": str(path)},
                headers=self._headers,
                timeout=120.0,
            )
            if response.status_code != 200 and "already been loaded" not in response.text:
                raise AdapterRefused(
                    f"replica {replica.url} refused adapter {ref.name}: "
                    f"{response.status_code} {response.text[:300]}"
                )
            replica.adapters[ref.name] = None
            replica.loaded_at[ref.name] = time.monotonic()
            self.loads += 1
            ADAPTER_LOADS.labels(replica.url).inc()
            log.info("adapter %s loaded on %s", ref.name, replica.url)

    async def _make_room(self, replica: Replica) -> None:
        while len(replica.adapters) >= self._capacity:
            victim = next((n for n in replica.adapters if not self.busy[(replica.url, n)]), None)
            if victim is None:
                # Every registered adapter is serving a request right now: go over capacity
                # for a moment rather than cut a request off (vLLM reloads from disk if its
                # own CPU cache overflows, and the files stay on disk while registered).
                return
            await self._unload(replica, victim)

    async def _unload(self, replica: Replica, name: str) -> None:
        response = await self._client.post(
            f"{replica.url}/v1/unload_lora_adapter",
            json={"lora_name": name},
            headers=self._headers,
            timeout=60.0,
        )
        if response.status_code not in (200, 400, 404):
            raise AdapterLoadError(
                f"replica {replica.url} failed to unload {name}: {response.status_code}"
            )
        replica.adapters.pop(name, None)
        replica.loaded_at.pop(name, None)
        ADAPTER_UNLOADS.labels(replica.url).inc()
        log.info("adapter %s unloaded from %s", name, replica.url)

    def forget_on(self, replica: Replica, name: str) -> None:
        """The replica answered 404 for ``name``: it no longer has it (e.g. it restarted)."""
        replica.adapters.pop(name, None)
        replica.loaded_at.pop(name, None)

    async def retire(self, name: str) -> None:
        """Unload a retired model from every replica and drop its local copy."""
        for replica in self._pool.replicas:
            # Under the lock: a load of this adapter in progress finishes first, then goes.
            async with replica.admin_lock:
                if name not in replica.adapters:
                    continue
                try:
                    await self._unload(replica, name)
                except (httpx.HTTPError, AdapterLoadError):
                    log.warning("could not unload retired %s from %s", name, replica.url)
        self._cache.forget(name)

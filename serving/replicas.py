"""The vLLM replicas: what each serves, whether it is healthy, and which one takes a request.

Each replica is asked ``GET /v1/models`` every few seconds. The answer says which base model
it serves (the entry without a parent) and which LoRA adapters it has registered (entries with
a parent), so the gateway's view of a replica is rebuilt from the replica itself: a restarted
replica shows up with no adapters and they are loaded again on demand.

Routing uses consistent hashing with bounded load: an adapter hashes to a point on a ring of
the healthy replicas of its base model and goes to the first replica from there whose in-flight
count is below ``ceil(c * (total + 1) / n)``. The same adapter keeps hitting the same replica
(so it is loaded once) unless that replica is overloaded or down.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx

log = logging.getLogger(__name__)

_VIRTUAL_NODES = 64
_LOAD_FACTOR = 1.25
# A replica that failed a request is not chosen again for this long, even before the next
# health check notices.
_FAILURE_COOLDOWN_SECONDS = 2.0


def _point(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    base_model: str | None = None
    max_model_len: int | None = None
    inflight: int = 0
    # Registered adapters in least-recently-used order (oldest first).
    adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # When the gateway registered each adapter (monotonic): a health answer older than that
    # must not make the gateway forget it.
    loaded_at: dict[str, float] = field(default_factory=dict)
    cooldown_until: float = 0.0
    last_error: str | None = None
    # Serializes load/unload calls on this replica so the capacity bookkeeping stays exact.
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.cooldown_until

    def mark_failed(self, reason: str) -> None:
        self.cooldown_until = time.monotonic() + _FAILURE_COOLDOWN_SECONDS
        self.last_error = reason

    def touch(self, adapter: str) -> None:
        if adapter in self.adapters:
            self.adapters.move_to_end(adapter)


class NoReplica(Exception):
    """No healthy replica serves the requested base model."""


class ReplicaPool:
    def __init__(self, urls: list[str], client: httpx.AsyncClient, headers: dict[str, str]):
        self.replicas = [Replica(url=u) for u in urls]
        self._client = client
        self._headers = headers
        # Per base model: ring positions, the replica at each, and the distinct replicas.
        self._rings: dict[str, tuple[list[int], list[Replica], list[Replica]]] = {}

    # ---- health -------------------------------------------------------------------------

    async def check(self, replica: Replica) -> None:
        """Refresh one replica's health, base model and registered adapters."""
        asked_at = time.monotonic()
        try:
            response = await self._client.get(
                f"{replica.url}/v1/models", headers=self._headers, timeout=5.0
            )
            response.raise_for_status()
            entries = response.json().get("data", [])
        except (httpx.HTTPError, ValueError) as exc:
            if replica.healthy:
                log.warning("replica %s is down: %s", replica.url, exc)
            replica.healthy = False
            replica.last_error = f"{type(exc).__name__}: {exc}"
            replica.adapters.clear()
            replica.loaded_at.clear()
            self._rings.clear()
            return
        base = next((e for e in entries if not e.get("parent")), None)
        loaded = {e["id"] for e in entries if e.get("parent")}
        # Keep our LRU order for the adapters still there; forget those the replica lost.
        for name in [n for n in replica.adapters if n not in loaded]:
            if replica.loaded_at.get(name, 0.0) < asked_at:  # not loaded while we asked
                del replica.adapters[name]
                replica.loaded_at.pop(name, None)
        for name in sorted(loaded - set(replica.adapters)):
            replica.adapters[name] = None
            replica.adapters.move_to_end(name, last=False)
        was = (replica.healthy, replica.base_model)
        replica.healthy = base is not None
        replica.base_model = base["id"] if base else None
        replica.max_model_len = base.get("max_model_len") if base else None
        replica.last_error = None if base else "serves no base model"
        if was != (replica.healthy, replica.base_model):
            log.info("replica %s healthy=%s base=%s", replica.url, replica.healthy, base)
            self._rings.clear()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def run_health_checks(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_all()
            except Exception:
                log.exception("health check round failed")

    # ---- routing ------------------------------------------------------------------------

    def serving(self, base_model: str) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r.base_model == base_model]

    def _ring(self, base_model: str) -> tuple[list[int], list[Replica], list[Replica]]:
        ring = self._rings.get(base_model)
        if ring is None:
            members = self.serving(base_model)
            points: list[tuple[int, Replica]] = []
            for replica in members:
                points.extend(
                    (_point(f"{replica.url}#{i}"), replica) for i in range(_VIRTUAL_NODES)
                )
            points.sort(key=lambda p: p[0])
            ring = ([p for p, _ in points], [r for _, r in points], members)
            self._rings[base_model] = ring
        return ring

    def choose(
        self, base_model: str, key: str, exclude: frozenset[Replica] = frozenset()
    ) -> Replica:
        """The replica for ``key`` (an adapter or base model name) with bounded load."""
        positions, owners, members = self._ring(base_model)
        candidates = [r for r in members if r.available and r not in exclude]
        if not candidates:
            # Replicas in cool-down are still better than none.
            candidates = [r for r in members if r.healthy and r not in exclude]
        if not candidates:
            raise NoReplica(base_model)
        total = sum(r.inflight for r in candidates)
        bound = math.ceil(_LOAD_FACTOR * (total + 1) / len(candidates))
        start = bisect.bisect(positions, _point(key)) % len(positions)
        for step in range(len(owners)):
            replica = owners[(start + step) % len(owners)]
            if replica in candidates and replica.inflight < bound:
                return replica
        return min(candidates, key=lambda r: r.inflight)

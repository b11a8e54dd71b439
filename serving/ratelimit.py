"""Per-tenant token buckets: requests per minute and tokens per minute.

Admission takes one request from the request bucket and needs the token bucket to be above
zero; the tokens a request really used (prompt + completion, known when it ends) are taken
afterwards, so a tenant that overdraws waits until the bucket refills. In production the
buckets are shared by every gateway process through Redis, synced every 100 ms (no round trip
per request); in embedded mode they live in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int
    tokens_per_minute: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0
    reason: str = ""


class RateLimiter(Protocol):
    async def admit(self, tenant_id: str, limits: Limits) -> Decision: ...

    def charge_tokens(self, tenant_id: str, limits: Limits, tokens: int) -> None: ...


def _refill(level: float, updated: float, now: float, capacity: float) -> float:
    return min(capacity, level + (now - updated) * capacity / 60.0)


class LocalRateLimiter:
    """Buckets in this process (embedded mode: one gateway process)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _take(self, key: str, capacity: float, amount: float, now: float) -> float:
        level, updated = self._buckets.get(key, (capacity, now))
        level = _refill(level, updated, now, capacity) - amount
        self._buckets[key] = (level, now)
        return level

    async def admit(self, tenant_id: str, limits: Limits) -> Decision:
        now = time.monotonic()
        rpm, tpm = float(limits.requests_per_minute), float(limits.tokens_per_minute)
        # A quota of zero (an admin's choice, or a tenant that no longer exists) never refills.
        if tpm <= 0:
            return Decision(False, 60.0, "tokens per minute")
        if rpm <= 0:
            return Decision(False, 60.0, "requests per minute")
        with self._lock:
            tokens_left = self._take(f"{tenant_id}:tok", tpm, 0, now)
            if tokens_left <= 0:
                return Decision(False, -tokens_left * 60.0 / tpm, "tokens per minute")
            level = self._take(f"{tenant_id}:req", rpm, 1, now)
            if level < 0:
                self._take(f"{tenant_id}:req", rpm, -1, now)  # give it back
                return Decision(False, -level * 60.0 / rpm, "requests per minute")
        return Decision(True)

    def charge_tokens(self, tenant_id: str, limits: Limits, tokens: int) -> None:
        with self._lock:
            self._take(
                f"{tenant_id}:tok", float(limits.tokens_per_minute), tokens, time.monotonic()
            )


# KEYS: request bucket, token bucket. ARGV: rpm, tpm, now (s), requests used, tokens used since
# the last sync. Each bucket is a hash {level, ts}; levels refill linearly to the capacity over a
# minute. Returns both levels after taking what was used.
_SYNC_LUA = """
local function settle(key, cap, now, used)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  level = math.min(cap, level + (now - ts) * cap / 60.0) - used
  redis.call('HSET', key, 'level', tostring(level), 'ts', tostring(now))
  -- A missing key reads as a full bucket: keep it until it would have refilled, so a debt
  -- (tokens are charged after admission) is not forgiven by waiting for the key to expire.
  redis.call('EXPIRE', key, math.max(120, math.ceil((cap - level) * 60 / cap) + 60))
  return tostring(level)
end
local rpm, tpm, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
return {settle(KEYS[1], rpm, now, tonumber(ARGV[4])), settle(KEYS[2], tpm, now, tonumber(ARGV[5]))}
"""


class SyncedRateLimiter(LocalRateLimiter):
    """Buckets shared through Redis without a round trip per request.

    Admission is decided on this process's copy of the tenant's buckets (no network on the hot
    path). The requests and tokens used here are taken from the shared buckets in Redis in one
    call per tenant, and the local copy is reset to the shared levels. A tenant is settled every
    ``sync_seconds`` (100 ms) while it matters: its local buckets are below half full, or it has
    used 5 % of a bucket here since the last settlement; otherwise (far from its limits, the
    usual case) once every ``relaxed_sync_seconds`` (1 s), which spares Redis and the gateway ten
    calls a second per active tenant. Reaching 5 % wakes the settlement at once rather than at
    the next tick. With N gateway processes a tenant can therefore exceed its limit by about 5 %
    of a bucket per process (plus what arrives during one Redis round trip), or one 100 ms
    interval's worth per process once the buckets are below half.
    """

    def __init__(
        self, url: str, sync_seconds: float = 0.1, relaxed_sync_seconds: float = 1.0
    ) -> None:
        super().__init__()
        self._redis = Redis.from_url(url)
        self._script = self._redis.register_script(_SYNC_LUA)
        self._sync_seconds = sync_seconds
        self._relaxed_sync_seconds = relaxed_sync_seconds
        self._used: dict[str, list[float]] = {}  # tenant -> [requests, tokens] since last sync
        self._limits: dict[str, Limits] = {}
        self._synced_at: dict[str, float] = {}  # tenant -> monotonic time of its last sync
        self._wake = asyncio.Event()

    async def admit(self, tenant_id: str, limits: Limits) -> Decision:
        decision = await super().admit(tenant_id, limits)
        self._limits[tenant_id] = limits
        if decision.allowed:
            used = self._used.setdefault(tenant_id, [0.0, 0.0])
            used[0] += 1
            if used[0] >= 0.05 * limits.requests_per_minute:
                self._wake.set()  # settle now, not at the next tick
        return decision

    def charge_tokens(self, tenant_id: str, limits: Limits, tokens: int) -> None:
        super().charge_tokens(tenant_id, limits, tokens)
        self._limits[tenant_id] = limits
        used = self._used.setdefault(tenant_id, [0.0, 0.0])
        used[1] += tokens
        if used[1] >= 0.05 * limits.tokens_per_minute:
            self._wake.set()

    def _due(self, tenant_id: str, now: float) -> bool:
        """Whether a tenant's use must be settled at this tick (see the class docstring)."""
        if now - self._synced_at.get(tenant_id, -math.inf) >= self._relaxed_sync_seconds:
            return True
        limits = self._limits[tenant_id]
        rpm, tpm = float(limits.requests_per_minute), float(limits.tokens_per_minute)
        requests, tokens = self._used.get(tenant_id, (0.0, 0.0))
        if requests >= 0.05 * rpm or tokens >= 0.05 * tpm:
            return True
        req_level = self._buckets.get(f"{tenant_id}:req", (rpm, now))[0]
        tok_level = self._buckets.get(f"{tenant_id}:tok", (tpm, now))[0]
        return req_level < 0.5 * rpm or tok_level < 0.5 * tpm

    async def sync(self, *, due_only: bool = False) -> None:
        """Settle this process's use with the shared buckets and adopt their levels: for every
        tenant, or (the background loop) only for those due now."""
        now = time.monotonic()
        tenants = [
            tenant_id
            for tenant_id in set(self._used) | set(self._limits)
            if not due_only or self._due(tenant_id, now)
        ]
        for tenant_id in tenants:
            limits = self._limits[tenant_id]
            used = self._used.pop(tenant_id, None)
            requests, tokens = used or (0.0, 0.0)
            keys = [f"loraplex:rl:{tenant_id}:req", f"loraplex:rl:{tenant_id}:tok"]
            args: list[str | int | float] = [
                limits.requests_per_minute,
                limits.tokens_per_minute,
                time.time(),
                requests,
                tokens,
            ]
            try:
                levels = await self._script(keys=keys, args=args)
            except Exception:
                # Keep what was used for the next sync; admission goes on locally meanwhile.
                pending = self._used.setdefault(tenant_id, [0.0, 0.0])
                pending[0] += requests
                pending[1] += tokens
                raise
            synced = time.monotonic()
            with self._lock:
                # What was admitted here since the call started is already in _used.
                self._buckets[f"{tenant_id}:req"] = (float(levels[0]), synced)
                self._buckets[f"{tenant_id}:tok"] = (float(levels[1]), synced)
            self._synced_at[tenant_id] = synced
            if used is None and tenant_id not in self._used:
                # Idle since the last settlement: stop syncing it.
                self._limits.pop(tenant_id, None)
                self._synced_at.pop(tenant_id, None)

    async def run(self) -> None:
        while True:
            # Every tick, or at once when a tenant has used 5 % of a bucket here.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sync_seconds)
            self._wake.clear()
            try:
                await self.sync(due_only=True)
            except Exception:
                log.warning("rate limit sync with Redis failed", exc_info=True)

    async def close(self) -> None:
        await self._redis.aclose()  # type: ignore[attr-defined,unused-ignore]  # stubs predate aclose


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

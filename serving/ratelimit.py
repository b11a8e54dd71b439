"""Per-tenant token buckets: requests per minute and tokens per minute.

Admission takes one request from the request bucket and needs the token bucket to be above
zero; the tokens a request really used (prompt + completion, known when it ends) are taken
afterwards, so a tenant that overdraws waits until the bucket refills. In production the
buckets live in Redis (one Lua call per admission, shared by every gateway process); in
embedded mode they live in the process.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis


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

    async def charge_tokens(self, tenant_id: str, limits: Limits, tokens: int) -> None: ...


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
        with self._lock:
            tokens_left = self._take(f"{tenant_id}:tok", tpm, 0, now)
            if tokens_left <= 0:
                return Decision(False, -tokens_left * 60.0 / tpm, "tokens per minute")
            level = self._take(f"{tenant_id}:req", rpm, 1, now)
            if level < 0:
                self._take(f"{tenant_id}:req", rpm, -1, now)  # give it back
                return Decision(False, -level * 60.0 / rpm, "requests per minute")
        return Decision(True)

    async def charge_tokens(self, tenant_id: str, limits: Limits, tokens: int) -> None:
        with self._lock:
            self._take(
                f"{tenant_id}:tok", float(limits.tokens_per_minute), tokens, time.monotonic()
            )


# KEYS: request bucket, token bucket. ARGV: rpm, tpm, now (s), mode ("admit" | tokens to take).
# Each bucket is a hash {level, ts}; levels refill linearly to the capacity over a minute.
_BUCKETS_LUA = """
local function level_of(key, cap, now)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  return math.min(cap, level + (now - ts) * cap / 60.0)
end
local rpm, tpm, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = level_of(KEYS[2], tpm, now)
if ARGV[4] ~= 'admit' then
  tokens = tokens - tonumber(ARGV[4])
  redis.call('HSET', KEYS[2], 'level', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[2], 120)
  return {1, '0'}
end
if tokens <= 0 then
  return {0, tostring(-tokens * 60.0 / tpm), 'tokens'}
end
local requests = level_of(KEYS[1], rpm, now)
if requests < 1 then
  return {0, tostring((1 - requests) * 60.0 / rpm), 'requests'}
end
redis.call('HSET', KEYS[1], 'level', tostring(requests - 1), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return {1, '0'}
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every gateway process."""

    def __init__(self, url: str) -> None:
        self._redis = Redis.from_url(url)
        self._script = self._redis.register_script(_BUCKETS_LUA)

    async def _call(self, tenant_id: str, limits: Limits, mode: str) -> list[bytes | int]:
        keys = [f"loraplex:rl:{tenant_id}:req", f"loraplex:rl:{tenant_id}:tok"]
        args: list[str | int | float] = [
            limits.requests_per_minute,
            limits.tokens_per_minute,
            time.time(),
            mode,
        ]
        result: list[bytes | int] = await self._script(keys=keys, args=args)
        return result

    async def admit(self, tenant_id: str, limits: Limits) -> Decision:
        result = await self._call(tenant_id, limits, "admit")
        if result[0] == 1:
            return Decision(True)
        retry = float(result[1])
        reason = "tokens per minute" if result[2] == b"tokens" else "requests per minute"
        return Decision(False, retry, reason)

    async def charge_tokens(self, tenant_id: str, limits: Limits, tokens: int) -> None:
        if tokens > 0:
            await self._call(tenant_id, limits, str(tokens))

    async def close(self) -> None:
        await self._redis.aclose()  # type: ignore[attr-defined,unused-ignore]  # stubs predate aclose


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))

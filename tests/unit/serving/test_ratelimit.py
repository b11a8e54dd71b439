"""Token buckets, in process and in a real Redis."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import Redis

from serving.ratelimit import Limits, LocalRateLimiter, RateLimiter, SyncedRateLimiter


async def _scenario(limiter: RateLimiter, tenant: str) -> None:
    limits = Limits(requests_per_minute=3, tokens_per_minute=100)
    for _ in range(3):
        assert (await limiter.admit(tenant, limits)).allowed
    refused = await limiter.admit(tenant, limits)
    assert not refused.allowed and refused.reason == "requests per minute"
    assert 0 < refused.retry_after <= 20.0 + 1e-6  # one request refills in 60/3 s
    # Another tenant has its own buckets.
    assert (await limiter.admit(tenant + "-other", limits)).allowed
    # Overdrawing tokens blocks admission until they refill.
    limiter.charge_tokens(tenant + "-t", limits, 150)
    blocked = await limiter.admit(tenant + "-t", limits)
    assert not blocked.allowed and blocked.reason == "tokens per minute"
    assert 25 <= blocked.retry_after <= 31  # 50 tokens short at 100/min


def test_local_buckets() -> None:
    asyncio.run(_scenario(LocalRateLimiter(), "tenant-a"))


def test_synced_buckets_alone_behave_like_local_ones(redis_url: str) -> None:
    async def run() -> None:
        limiter = SyncedRateLimiter(redis_url)
        try:
            await _scenario(limiter, "tenant-" + secrets.token_hex(4))
            await limiter.sync()
        finally:
            await limiter.close()

    asyncio.run(run())


def test_two_gateway_processes_share_the_buckets_through_redis(redis_url: str) -> None:
    async def run() -> None:
        first, second = SyncedRateLimiter(redis_url), SyncedRateLimiter(redis_url)
        tenant, limits = "tenant-" + secrets.token_hex(4), Limits(4, 1000)
        try:
            for _ in range(3):
                assert (await first.admit(tenant, limits)).allowed
            first.charge_tokens(tenant, limits, 1500)  # overdraws the shared tokens
            await first.sync()
            # The other process learns the shared levels at its next sync.
            assert (await second.admit(tenant, limits)).allowed  # its copy was still full
            await second.sync()
            refused = await second.admit(tenant, limits)
            assert not refused.allowed and refused.reason == "tokens per minute"
            await first.sync()
            assert not (await first.admit(tenant, limits)).allowed
        finally:
            await first.close()
            await second.close()

    asyncio.run(run())


def test_a_debt_outlives_the_usual_expiry_of_the_shared_bucket(redis_url: str) -> None:
    """A missing key reads as a full bucket: a tenant 100 minutes in debt must not be forgiven
    when the key would otherwise expire (2 minutes)."""

    async def run() -> None:
        limiter = SyncedRateLimiter(redis_url)
        shared = Redis.from_url(redis_url)
        tenant, limits = "tenant-" + secrets.token_hex(4), Limits(600, 10_000)
        try:
            assert (await limiter.admit(tenant, limits)).allowed
            limiter.charge_tokens(tenant, limits, 1_000_000)
            await limiter.sync()
            ttl = await shared.ttl(f"loraplex:rl:{tenant}:tok")
            assert ttl >= 100 * 60  # ~101 minutes to refill, plus a margin
            assert 0 < await shared.ttl(f"loraplex:rl:{tenant}:req") <= 180  # not in debt
        finally:
            await shared.delete(f"loraplex:rl:{tenant}:req", f"loraplex:rl:{tenant}:tok")
            await shared.aclose()
            await limiter.close()

    asyncio.run(run())


def test_tenants_far_from_their_limits_are_settled_less_often(redis_url: str) -> None:
    async def run() -> None:
        limiter = SyncedRateLimiter(redis_url, relaxed_sync_seconds=60)
        shared = Redis.from_url(redis_url)
        far, near = "far-" + secrets.token_hex(4), "near-" + secrets.token_hex(4)
        try:
            assert (await limiter.admit(far, Limits(1000, 10**6))).allowed
            assert (await limiter.admit(near, Limits(10, 10**6))).allowed
            await limiter.sync(due_only=True)  # never settled: both are due
            assert float(await shared.hget(f"loraplex:rl:{far}:req", "level")) == 999
            for _ in range(5):
                assert (await limiter.admit(far, Limits(1000, 10**6))).allowed
                assert (await limiter.admit(near, Limits(10, 10**6))).allowed
            await limiter.sync(due_only=True)
            # 5 of 1000 used, bucket nearly full: waits for the relaxed interval.
            assert float(await shared.hget(f"loraplex:rl:{far}:req", "level")) == 999
            # 6 of 10 used, below half: settled at once.
            level = float(await shared.hget(f"loraplex:rl:{near}:req", "level"))
            assert 4 <= level < 4.1
            await limiter.sync()  # everything, as at shutdown
            assert (
                994 <= float(await shared.hget(f"loraplex:rl:{far}:req", "level")) < 995
            )  # + refill
        finally:
            await limiter.close()
            await shared.aclose()

    asyncio.run(run())


def test_using_five_percent_of_a_bucket_settles_at_once(redis_url: str) -> None:
    async def run() -> None:
        # Ticks so far apart that only the wake-up can explain a settlement.
        limiter = SyncedRateLimiter(redis_url, sync_seconds=30, relaxed_sync_seconds=60)
        shared = Redis.from_url(redis_url)
        tenant, limits = "burst-" + secrets.token_hex(4), Limits(100, 10**6)
        loop = asyncio.create_task(limiter.run())
        try:
            for _ in range(4):
                assert (await limiter.admit(tenant, limits)).allowed
            await asyncio.sleep(0.2)
            assert await shared.hget(f"loraplex:rl:{tenant}:req", "level") is None
            assert (await limiter.admit(tenant, limits)).allowed  # the 5th of 100: 5 %
            for _ in range(50):
                if await shared.hget(f"loraplex:rl:{tenant}:req", "level") is not None:
                    break
                await asyncio.sleep(0.02)
            assert 95 <= float(await shared.hget(f"loraplex:rl:{tenant}:req", "level")) < 95.5
        finally:
            loop.cancel()
            await limiter.close()
            await shared.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("tokens", [0, -5])
def test_charging_nothing_changes_nothing(tokens: int) -> None:
    async def run() -> None:
        limiter = LocalRateLimiter()
        limits = Limits(10, 10)
        limiter.charge_tokens("t", limits, max(tokens, 0))
        assert (await limiter.admit("t", limits)).allowed

    asyncio.run(run())


@pytest.mark.parametrize("limits", [Limits(0, 1000), Limits(10, 0), Limits(0, 0)])
def test_a_quota_of_zero_refuses_every_request(limits: Limits) -> None:
    """Zero is a quota a platform admin may set (and what a vanished tenant gets): a 429."""

    async def run() -> None:
        refused = await LocalRateLimiter().admit("t", limits)
        assert not refused.allowed and refused.retry_after == 60.0
        assert refused.reason == (
            "tokens per minute" if limits.tokens_per_minute == 0 else "requests per minute"
        )

    asyncio.run(run())

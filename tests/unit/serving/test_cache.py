"""The refreshing cache: fresh hits, stale-while-refreshing, the staleness bound, single flight."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from serving.cache import RefreshingCache


def test_fresh_stale_and_expired() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def load() -> int:
        with lock:
            calls.append(1)
            return len(calls)

    async def run() -> None:
        cache: RefreshingCache[int] = RefreshingCache(ttl=0.1, max_stale=0.3)
        assert await cache.get("k", load) == 1
        assert await cache.get("k", load) == 1 and len(calls) == 1  # fresh
        await asyncio.sleep(0.15)
        assert await cache.get("k", load) == 1  # stale: answered at once...
        await asyncio.sleep(0.05)
        assert len(calls) == 2 and await cache.get("k", load) == 2  # ...and refreshed behind
        await asyncio.sleep(0.35)
        assert await cache.get("k", load) == 3  # too old: waited for
        cache.forget("k")
        assert await cache.get("k", load) == 4

    asyncio.run(run())


def test_concurrent_misses_share_one_load_and_none_is_remembered() -> None:
    calls: list[float] = []

    def slow_missing() -> None:
        calls.append(time.monotonic())
        time.sleep(0.05)

    async def run() -> None:
        cache: RefreshingCache[str] = RefreshingCache(ttl=10, max_stale=10)
        results = await asyncio.gather(*(cache.get("gone", slow_missing) for _ in range(50)))
        assert results == [None] * 50 and len(calls) == 1
        assert await cache.get("gone", slow_missing) is None and len(calls) == 1

    asyncio.run(run())


def test_a_watched_cache_trusts_found_entries_while_the_watch_reports() -> None:
    calls: list[str] = []

    def load(value: str | None) -> Callable[[], str | None]:
        def run() -> str | None:
            calls.append(str(value))
            return value

        return run

    async def run() -> None:
        cache: RefreshingCache[str] = RefreshingCache(ttl=0.05, max_stale=0.1, watched_ttl=60)
        assert await cache.get("key", load("principal")) == "principal"
        assert await cache.get("missing", load(None)) is None
        cache.watched(time.monotonic(), valid_for=0.3)
        await asyncio.sleep(0.15)
        # Past max_stale, but the watch reports: the found entry is used without a reload...
        assert await cache.get("key", load("reloaded")) == "principal"
        # ...while "not found" keeps the short bounds (a key may have been created since).
        assert await cache.get("missing", load("created")) == "created"
        assert calls == ["principal", "None", "created"]
        # The watch reported a change: the entry is gone at once.
        cache.forget("key")
        assert await cache.get("key", load("after revocation")) == "after revocation"
        # The watch stopped reporting: the short bounds apply again.
        await asyncio.sleep(0.35)
        assert await cache.get("key", load("short again")) == "short again"

    asyncio.run(run())


def test_forget_where_drops_the_matching_entries() -> None:
    async def run() -> None:
        cache: RefreshingCache[str] = RefreshingCache(ttl=60, max_stale=60)
        for key, value in [("a", "base-1"), ("b", "base-2"), ("c", None)]:
            await cache.get(key, lambda v=value: v)  # type: ignore[misc]
        cache.forget_where(lambda key, value: value == "base-1" or key == "c")
        assert await cache.get("a", lambda: "reloaded") == "reloaded"
        assert await cache.get("b", lambda: "reloaded") == "base-2"
        assert await cache.get("c", lambda: "reloaded") == "reloaded"

    asyncio.run(run())


def test_a_load_in_flight_when_its_key_is_forgotten_is_not_kept() -> None:
    """A revocation (or retirement) reported while a load that read the old row is running:
    that load must not put the old answer back, and requests after the report must not wait
    for it either."""
    started, release = threading.Event(), threading.Event()

    def old_row() -> str:
        started.set()
        release.wait(5)
        return "valid"

    async def run() -> None:
        cache: RefreshingCache[str] = RefreshingCache(ttl=60, max_stale=60)
        before = asyncio.ensure_future(cache.get("key", old_row))
        await asyncio.to_thread(started.wait, 5)
        cache.forget("key")  # the watch saw the revocation while the load ran
        after = asyncio.ensure_future(cache.get("key", lambda: None))
        await asyncio.sleep(0.05)
        release.set()
        assert await before == "valid"  # already asked before the report
        assert await after is None
        assert await cache.get("key", lambda: "reloaded") is None  # "revoked" is what's kept

    asyncio.run(run())


def test_a_full_cache_drops_its_oldest_entry_not_everyone_s() -> None:
    loads: list[str] = []

    def loader(key: str) -> Callable[[], str]:
        def load() -> str:
            loads.append(key)
            return key.upper()

        return load

    async def run() -> None:
        cache: RefreshingCache[str] = RefreshingCache(ttl=60, max_stale=60, max_entries=3)
        for key in ("a", "b", "c", "d"):  # "d" makes room by dropping "a", the oldest
            assert await cache.get(key, loader(key)) == key.upper()
        loads.clear()
        for key in ("b", "c", "d"):
            assert await cache.get(key, loader(key)) == key.upper()
        assert loads == []  # still cached
        assert await cache.get("a", loader("a")) == "A" and loads == ["a"]

    asyncio.run(run())

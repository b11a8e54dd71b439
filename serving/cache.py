"""Answers remembered briefly, refreshed in the background so no request waits for them.

An entry younger than ``ttl`` is used as it is. An entry older than that but younger than
``max_stale`` is still used, and one background load (per key) replaces it; only a missing or
too-old entry makes the request wait for the load (single flight: concurrent requests for the
same key share one load). ``max_stale`` is therefore the bound on how long a change (a revoked
key, a deleted model) can go unnoticed; "not found" answers are remembered too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from anyio import to_thread

log = logging.getLogger(__name__)

T = TypeVar("T")


class RefreshingCache(Generic[T]):
    def __init__(self, ttl: float, max_stale: float, max_entries: int = 50_000) -> None:
        self.ttl = ttl
        self.max_stale = max(max_stale, ttl)
        self._max = max_entries
        self._entries: dict[Hashable, tuple[float, T | None]] = {}
        self._loading: dict[Hashable, asyncio.Future[T | None]] = {}

    async def get(self, key: Hashable, load: Callable[[], T | None]) -> T | None:
        """The value for ``key``; ``load`` is a blocking function run in a thread."""
        entry = self._entries.get(key)
        if entry is not None:
            age = time.monotonic() - entry[0]
            if age < self.ttl:
                return entry[1]
            if age < self.max_stale:
                if key not in self._loading:
                    self._start(key, load).add_done_callback(_quiet)
                return entry[1]
        running = self._loading.get(key)
        if running is None:
            running = self._start(key, load)
        return await asyncio.shield(running)

    def _start(self, key: Hashable, load: Callable[[], T | None]) -> asyncio.Future[T | None]:
        future: asyncio.Future[T | None] = asyncio.ensure_future(self._load(key, load))
        self._loading[key] = future
        return future

    async def _load(self, key: Hashable, load: Callable[[], T | None]) -> T | None:
        try:
            value = await to_thread.run_sync(load)
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (time.monotonic(), value)
            return value
        finally:
            self._loading.pop(key, None)

    def forget(self, key: Hashable) -> None:
        self._entries.pop(key, None)


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("background refresh failed: %s", future.exception())

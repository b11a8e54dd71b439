"""Answers remembered briefly, refreshed in the background so no request waits for them.

An entry younger than ``ttl`` is used as it is. An entry older than that but younger than
``max_stale`` is still used, and one background load (per key) replaces it; only a missing or
too-old entry makes the request wait for the load (single flight: concurrent requests for the
same key share one load). ``max_stale`` is therefore the bound on how long a change (a revoked
key, a deleted model) can go unnoticed; "not found" answers are remembered too.

A cache can also be *watched*: a loop that polls for changes forgets the keys that changed and
then calls ``watched()``. While those reports keep coming, found entries are trusted for
``watched_ttl`` instead of ``ttl`` (one poll for every key instead of one reload per key per
``ttl``); when they stop, the short bounds apply again. "Not found" answers always keep the short
bounds, since nothing reports that something started to exist.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from anyio import to_thread

log = logging.getLogger(__name__)

T = TypeVar("T")


class RefreshingCache(Generic[T]):
    def __init__(
        self,
        ttl: float,
        max_stale: float,
        max_entries: int = 50_000,
        *,
        watched_ttl: float | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_stale = max(max_stale, ttl)
        self.watched_ttl = watched_ttl
        self._watched_until = -math.inf
        self._max = max_entries
        self._entries: dict[Hashable, tuple[float, T | None]] = {}
        self._loading: dict[Hashable, asyncio.Future[T | None]] = {}

    def watched(self, polled_at: float, valid_for: float) -> None:
        """The watcher has forgotten every key changed up to ``polled_at`` (the monotonic time
        its query started); trust found entries for ``watched_ttl`` until ``valid_for`` seconds
        after that (unless it reports again). Counted from the query's start, so a slow
        database shortens the trust instead of stretching it."""
        self._watched_until = max(self._watched_until, polled_at + valid_for)

    async def get(self, key: Hashable, load: Callable[[], T | None]) -> T | None:
        """The value for ``key``; ``load`` is a blocking function run in a thread."""
        entry = self._entries.get(key)
        if entry is not None:
            now = time.monotonic()
            age = now - entry[0]
            ttl, max_stale = self.ttl, self.max_stale
            if self.watched_ttl and entry[1] is not None and now < self._watched_until:
                ttl, max_stale = self.watched_ttl, 2 * self.watched_ttl
            if age < ttl:
                return entry[1]
            if age < max_stale:
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
        this = asyncio.current_task()
        try:
            value = await to_thread.run_sync(load)
            if self._loading.get(key) is this:  # not forgotten while it ran
                self._entries.pop(key, None)  # re-inserted last: the order is load order
                if len(self._entries) >= self._max:
                    # Drop the entry loaded longest ago (a hot key is reloaded every ttl, so
                    # it is never that one); a flood of new keys cannot clear everyone's.
                    del self._entries[next(iter(self._entries))]
                self._entries[key] = (time.monotonic(), value)
            return value
        finally:
            if self._loading.get(key) is this:
                del self._loading[key]

    def forget(self, key: Hashable) -> None:
        """Drop ``key``, and disown a load of it in flight: that load may have read the row
        before the change, so its answer is not kept and later requests load afresh."""
        self._entries.pop(key, None)
        self._loading.pop(key, None)

    def forget_where(self, matches: Callable[[Any, T | None], bool]) -> None:
        """Forget every entry for which ``matches(key, value)`` holds (a scan: for rare events)."""
        for key in [k for k, (_, value) in self._entries.items() if matches(k, value)]:
            del self._entries[key]
            self._loading.pop(key, None)


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("background refresh failed: %s", future.exception())
